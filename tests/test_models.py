"""Networks, jigsaw and the offline ImageNet weights (checked against a real photo)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from sofar_assets.lib.model.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    _offline_weights_path,
    build_model,
    jigsaw,
    load_offline_imagenet_weights,
    offline_imagenet_state_dict,
)

ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504


def _photo_batch(size: int = 224) -> torch.Tensor:
    """scikit-image's bundled photos, short side resized to ``size`` and centre-cropped, [0, 1]."""
    from skimage import data

    out = []
    for img in (data.coffee(), data.chelsea(), data.astronaut(), data.rocket()):
        pil = Image.fromarray(np.ascontiguousarray(img[..., :3]))
        w, h = pil.size
        scale = size / min(w, h)
        pil = pil.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        w, h = pil.size
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.array(pil.crop((left, top, left + size, top + size)))
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


# --------------------------------------------------------------------------- spec


def test_spec_round_trips_through_json_types():
    spec = ModelSpec(num_classes=4, arch="pmg", backbone="resnet10t", pretrained=False, image_size=96,
                     mean=[0.1, 0.2, 0.3], std=(1, 2, 3), pmg_feature_dim=64)
    d = spec.to_dict()
    assert d["mean"] == [0.1, 0.2, 0.3] and d["std"] == [1.0, 2.0, 3.0]
    assert ModelSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="unknown ModelSpec fields"):
        ModelSpec.from_dict({**d, "dropout": 0.5})
    with pytest.raises(ValueError, match="unknown arch"):
        ModelSpec(num_classes=2, arch="vit_head")


# --------------------------------------------------------------------------- shapes


def test_linear_head_shapes_and_normalization_inside():
    spec = ModelSpec(num_classes=5, backbone="resnet10t", pretrained=False, image_size=64,
                     mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 0.125))
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        # the module must apply exactly (x - mean) / std before the backbone
        mean = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
        std = torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
        manual = model.head(model.backbone((x - mean) / std))
    assert out.shape == (3, 5)
    assert torch.allclose(out, manual, atol=1e-6)
    head = list(model.head_parameters())
    assert [p.shape for p in head] == [torch.Size([5, model.backbone.num_features]), torch.Size([5])]
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.backbone_parameters()) + sum(p.numel() for p in head) == n_all
    # normalization constants come from the spec, not from the saved weights
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


@pytest.mark.parametrize("arch", ["linear", "pmg"])
def test_forward_features_gives_the_logits_and_the_heads_input(arch):
    spec = ModelSpec(num_classes=3, arch=arch, backbone="resnet10t", pretrained=False, image_size=64,
                     pmg_feature_dim=8)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model.forward_features(x)
        assert torch.allclose(logits, model(x), atol=1e-6)
        head = model.head if arch == "linear" else model.classifier_concat
        assert torch.allclose(head(feats), logits, atol=1e-6)
    assert feats.shape == (2, model.backbone.num_features if arch == "linear" else 3 * 8)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet10t"])
def test_pmg_four_heads_shapes_and_backward(backbone):
    spec = ModelSpec(num_classes=3, arch="pmg", backbone=backbone, pretrained=False, image_size=64,
                     pmg_feature_dim=32)
    torch.manual_seed(0)
    model = build_model(spec).train()
    x = torch.rand(4, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 1])
    outs = model.forward_all(x)
    assert len(outs) == 4 and all(o.shape == (4, 3) for o in outs)
    sum(F.cross_entropy(o, y) for o in outs).backward()
    for i in range(3):
        for p in model.classifiers[i].parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"head {i + 1} got no gradient"
        assert model.conv_blocks[i][0].weight.grad.abs().sum() > 0
    for p in model.classifier_concat.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone_parameters())
    # the three stage taps really have the backbone's channel counts
    chans = model.backbone.feature_info.channels()
    assert [blk[0].in_channels for blk in model.conv_blocks] == list(chans)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_all(x)[3], atol=1e-6)


def test_forward_all_is_pmg_only():
    model = build_model(ModelSpec(num_classes=2, backbone="resnet10t", pretrained=False, image_size=32))
    with pytest.raises(ValueError, match="pmg"):
        model.forward_all(torch.rand(2, 3, 32, 32))


# --------------------------------------------------------------------------- jigsaw


def _cells(img: torch.Tensor, n: int) -> list[bytes]:
    c, h, w = img.shape
    ph, pw = h // n, w // n
    return [img[:, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].numpy().tobytes() for i in range(n) for j in range(n)]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_jigsaw_moves_every_cell_exactly_once(n):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    g = torch.Generator().manual_seed(3)
    out = jigsaw(x, n, generator=g)
    assert out.shape == x.shape
    for b in range(2):
        before, after = _cells(x[b], n), _cells(out[b], n)
        assert sorted(before) == sorted(after)  # a permutation: each cell exactly once
        assert len(set(after)) == n * n
    # one permutation for the batch: the cell mapping of image 0 and image 1 agree
    perm0 = [_cells(x[0], n).index(c) for c in _cells(out[0], n)]
    perm1 = [_cells(x[1], n).index(c) for c in _cells(out[1], n)]
    assert perm0 == perm1
    # with 4+ cells some seed among a few must give a non-identity shuffle
    moved = [not torch.equal(jigsaw(x, n, generator=torch.Generator().manual_seed(s)), x) for s in range(4)]
    assert any(moved)


def test_jigsaw_identity_for_n1_and_edges_kept_when_not_divisible():
    x = torch.rand(1, 3, 10, 11)
    assert torch.equal(jigsaw(x, 1), x)
    out = jigsaw(x, 3, generator=torch.Generator().manual_seed(1))
    # 3x3 cells of 3x3 pixels cover rows/cols 0..8; row 9 and cols 9..10 stay put
    assert torch.equal(out[..., 9:, :], x[..., 9:, :])
    assert torch.equal(out[..., :, 9:], x[..., :, 9:])
    assert sorted(_cells(out[0, :, :9, :9], 3)) == sorted(_cells(x[0, :, :9, :9], 3))
    with pytest.raises(ValueError, match="too small"):
        jigsaw(torch.rand(1, 3, 4, 4), 8)


# --------------------------------------------------------------------------- offline weights


def test_offline_weights_map_one_to_one_onto_timm():
    raw = torch.load(_offline_weights_path(), map_location="cpu", weights_only=True)
    mapped = offline_imagenet_state_dict()
    ref = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert len(raw) == len(mapped) == len(ref) == 296
    assert list(mapped) == list(ref)
    for (rk, rv), (mk, mv) in zip(raw.items(), mapped.items(), strict=True):
        assert mv.shape == ref[mk].shape
        assert torch.equal(rv, mv), (rk, mk)
    assert list(raw)[0] == "_conv_stem.weight" and list(mapped)[0] == "conv_stem.weight"
    assert list(raw)[-1] == "_fc.bias" and list(mapped)[-1] == "classifier.bias"


def test_offline_weights_reach_linear_and_features_only_backbones():
    mapped = offline_imagenet_state_dict()
    for arch in ("linear", "pmg"):
        model = build_model(ModelSpec(num_classes=2, arch=arch, pretrained=True, image_size=64, pmg_feature_dim=16))
        sd = model.backbone.state_dict()
        assert len(sd) >= 280  # all blocks, only the classifier (and conv_head for pmg) dropped
        for k, v in sd.items():
            assert torch.equal(v, mapped[k]), k
    # and a features_only model built directly from timm
    feats = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3, 4))
    load_offline_imagenet_weights(feats)
    assert torch.equal(feats.blocks[6][0].conv_pwl.weight, mapped["blocks.6.0.conv_pwl.weight"])


def test_offline_weights_refuse_other_models():
    with pytest.raises(ValueError, match="absent from the offline efficientnet_lite0"):
        load_offline_imagenet_weights(timm.create_model("resnet10t", pretrained=False))
    with pytest.raises(ValueError, match=r"only for efficientnet_lite0.*model\.pretrained: false"):
        build_model(ModelSpec(num_classes=2, backbone="resnet10t", pretrained=True))


def test_coffee_photo_is_espresso_through_sofarnet():
    pytest.importorskip("skimage")
    spec = ModelSpec(num_classes=1000, pretrained=True)  # default normalization
    model = build_model(spec).eval()
    mapped = offline_imagenet_state_dict()
    model.head.load_state_dict({"weight": mapped["classifier.weight"], "bias": mapped["classifier.bias"]})
    x = _photo_batch()[:1]  # coffee
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in {ESPRESSO, CUP, COFFEE_MUG}, top5
    assert probs[ESPRESSO] > 0.5


def test_default_normalization_matches_the_weights_bn_statistics():
    """The stem output under the default mean/std should have the variance the first BN expects."""
    pytest.importorskip("skimage")
    model = build_model(ModelSpec(num_classes=2, pretrained=True)).eval()
    stem, bn = model.backbone.conv_stem, model.backbone.bn1
    live = bn.running_var > 1e-2  # a few stem channels are dead (zero variance)
    x = _photo_batch()

    def log_var_ratio(mean, std) -> float:
        xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            out = stem(xn)
        return (out.var((0, 2, 3)) / bn.running_var)[live].log().abs().mean().item()

    ours = log_var_ratio(ModelSpec(num_classes=2).mean, ModelSpec(num_classes=2).std)
    imagenet = log_var_ratio(IMAGENET_MEAN, IMAGENET_STD)
    assert ours < 0.8 < imagenet, (ours, imagenet)
