"""The scoring core: a batch of decoded photos -> the prediction table's columns.

ONE implementation, called by both users of a model version: ``daily_predictions`` (through
:func:`~sofar_assets.lib.serving.inference.predict_images`, which streams and batches the reads) and the
served MLflow model (:mod:`~sofar_assets.lib.serving.pyfunc_model`). Network -> logits (+ penultimate
features) -> ``softmax(logits / temperature)`` -> top-2 -> conformal label set -> OOD score and
verdict, so a photo gets the same row from both.

The network runs on a *runner*: :class:`TorchRunner` (the reference, any device) or
:class:`OnnxRunner` (the package's ``model.onnx`` on ONNX Runtime's CPU provider, what CPU
nodes use). Both take the batch as uint8 NHWC and compute ``x / 255`` in float32 the same way.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from sofar_assets.lib.common.devices import resolve_device
from sofar_assets.lib.model import ood
from sofar_assets.lib.model.conformal import LabelSets, set_labels
from sofar_assets.lib.warehouse.predictions import PREDICTION_COLUMNS, prediction_frame  # noqa: F401

RUNTIMES = ("torch", "onnx")
ONNX_INPUT = "images"
ONNX_OUTPUTS = ("logits", "features")
ONNX_OPSET = 17

@dataclass(frozen=True)
class Scoring:
    """What turns logits (and features) into a row, besides the network: the version's
    calibration (score method, temperature, threshold, label-set rule) and its package's
    feature statistics (kNN bank / Mahalanobis) with the kNN ``knn_k``."""

    classes: Sequence[str]
    threshold: float
    score_method: str = "max_logit"
    temperature: float = 1.0
    label_sets: LabelSets | None = None
    ood_stats: dict | None = field(default=None, repr=False)
    knn_k: int = 1

    def __post_init__(self) -> None:
        if self.score_method not in ood.METHODS:
            raise ValueError(f"unknown OOD score method {self.score_method!r}; valid: {', '.join(ood.METHODS)}")
        missing = ood.missing_stats(self.score_method, self.ood_stats)
        if missing:
            raise ValueError(f"OOD score {self.score_method!r} needs the model package's feature statistics "
                             f"{missing}, which were not given")

    @property
    def needs_features(self) -> bool:
        return self.score_method in ood.FEATURE_METHODS


def _nchw01(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float32 NCHW in [0, 1] (a channels_last view, no copy of the layout)."""
    return x.permute(0, 3, 1, 2).float().div_(255)


class TorchRunner:
    """A torch network (PyTorch, the reference): ``model(x)`` -> logits, and
    ``model.forward_features(x)`` -> (logits, features) when features are needed."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "auto"):
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.has_features = callable(getattr(model, "forward_features", None))
        self.name = type(model).__name__

    def __call__(self, x, features: bool, on_device: bool = False) -> tuple[np.ndarray, object]:
        """Logits as numpy; features as numpy, or as a tensor left on the device (``on_device``:
        the kNN search of :class:`~sofar_assets.lib.model.ood.DeviceKnn` runs there)."""
        x = torch.as_tensor(x)
        with torch.inference_mode():
            x = _nchw01(x.to(self.device, non_blocking=True))
            if features:
                out, feats = self.model.forward_features(x)
                return out.float().cpu().numpy(), (feats if on_device else feats.float().cpu().numpy())
            return self.model(x).float().cpu().numpy(), None


class OnnxRunner:
    """The package's ONNX export on ONNX Runtime (CPU). ``threads``: intra-op threads (None:
    ONNX Runtime's default, one per core; 1 for a serving worker per core)."""

    device = torch.device("cpu")

    def __init__(self, onnx_model: bytes | str, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])
        self.has_features = len(self.session.get_outputs()) > 1
        self.name = "onnx"

    def __call__(self, x, features: bool, on_device: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.as_tensor(x)
        arr = np.ascontiguousarray(_nchw01(x).numpy())
        if features:
            logits, feats = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: arr})
            return logits, feats
        (logits,) = self.session.run([ONNX_OUTPUTS[0]], {ONNX_INPUT: arr})
        return logits, None


def make_runner(model, meta: dict | None = None, runtime: str = "torch", device: str | torch.device = "auto",
                threads: int | None = None):
    """The runner for ``runtime``: ``torch`` wraps ``model``; ``onnx`` runs the package's
    ``model.onnx`` (``meta["onnx_model"]``, :func:`~sofar_assets.lib.serving.packaging.load_package`)
    on the CPU. A runner passes through unchanged."""
    if isinstance(model, (TorchRunner, OnnxRunner)):
        return model
    if runtime == "torch":
        return TorchRunner(model, device)
    if runtime == "onnx":
        onnx_model = (meta or {}).get("onnx_model")
        if not onnx_model:
            raise ValueError("inference.runtime is 'onnx' but this model package has no model.onnx (registered "
                             "before the ONNX export existed, or its export failed): re-train, or use runtime 'torch'")
        return OnnxRunner(onnx_model, threads)
    raise ValueError(f"unknown inference runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")


def export_onnx(model: torch.nn.Module, image_size: int) -> bytes:
    """``model`` as ONNX bytes: float32 NCHW [0, 1] ``images`` (dynamic batch) -> ``logits``
    (+ ``features`` when the model has ``forward_features``). Exports a copy: the legacy
    exporter's tracing changes the traced module's state (measured: logits moved by 0.5)."""
    import copy
    import warnings

    net = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    has_features = callable(getattr(net, "forward_features", None))

    class _Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.forward_features(x) if has_features else self.net(x)

    outputs = list(ONNX_OUTPUTS if has_features else ONNX_OUTPUTS[:1])
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(_Graph().eval(), torch.zeros(1, 3, image_size, image_size), buf, dynamo=False,
                          input_names=[ONNX_INPUT], output_names=outputs, opset_version=ONNX_OPSET,
                          dynamic_axes={ONNX_INPUT: {0: "n"}, **{o: {0: "n"} for o in outputs}})
    return buf.getvalue()


class Predictor:
    """A runner + a :class:`Scoring`: decoded photos in, the prediction columns out."""

    def __init__(self, runner, scoring: Scoring):
        if scoring.needs_features and not runner.has_features:
            raise ValueError(f"OOD score {scoring.score_method!r} needs penultimate features: "
                             f"{runner.name} has no forward_features")
        self.runner = runner
        self.scoring = scoring
        # the kNN search on the inference device, the bank copied there once (None: another score)
        self.knn = ood.device_knn(scoring.score_method, scoring.ood_stats, runner.device)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def probs_and_scores(self, x) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S, 3) -> (calibrated probabilities (N, C), OOD scores (N,))."""
        s = self.scoring
        logits, features = self.runner(x, s.needs_features, on_device=self.knn is not None)
        n = int(x.shape[0])
        if logits.shape != (n, len(s.classes)):
            raise ValueError(f"model returned logits of shape {logits.shape} for {n} images, "
                             f"but there are {len(s.classes)} classes")
        probs = ood.softmax(logits, s.temperature)
        scores = (self.knn.score(features, s.knn_k) if self.knn is not None
                  else ood.score(logits, features, s.score_method, s.temperature, s.ood_stats, knn_k=s.knn_k))
        return probs, scores

    def frame(self, ids, uris, errors, good, x, days=None) -> pd.DataFrame:
        """The rows of one batch: ``x`` holds the decoded images of the rows ``good`` (None if
        none); every other row is an error row (``errors``). ``days``: each row's day (None: none)."""
        probs = scores = None
        if good:
            probs, scores = self.probs_and_scores(x)
        return frame(ids, uris, errors, good, probs, scores, self.scoring.threshold, self.scoring.classes,
                     self.scoring.label_sets, days)


def frame(ids, uris, errors, good, probs, scores, threshold, classes,
          label_sets: LabelSets | None = None, days=None) -> pd.DataFrame:
    """The prediction columns from a batch's probabilities and OOD scores (rows ``good``);
    ``days`` are the rows' days (:data:`PREDICTION_DATE`; None: the rows have no day)."""
    n = len(ids)
    top1_label = np.full(n, None, dtype=object)
    top2_label = np.full(n, None, dtype=object)
    top1_prob = np.full(n, np.nan)
    top2_prob = np.full(n, np.nan)
    label_set = np.full(n, None, dtype=object)  # NULL: an error row, or a model without a rule
    label_set_size = pd.array([None] * n, dtype="Int64")
    ood_score = np.full(n, np.nan)
    is_ood = np.zeros(n, dtype=bool)  # an error row is not an OOD verdict; its error says why
    if good:
        rows = np.asarray(good)
        names = np.asarray(classes, dtype=object)
        order = np.argsort(-probs, axis=1, kind="stable")  # ties: the lower class index first
        top1_label[rows] = names[order[:, 0]]
        top1_prob[rows] = probs[np.arange(len(rows)), order[:, 0]]
        if probs.shape[1] > 1:
            top2_label[rows] = names[order[:, 1]]
            top2_prob[rows] = probs[np.arange(len(rows)), order[:, 1]]
        ood_score[rows] = scores
        is_ood[rows] = scores < threshold
        if label_sets is not None:
            text, sizes = set_labels(label_sets.mask(probs), probs, classes)
            label_set[rows] = text
            label_set_size[rows] = sizes
    return prediction_frame([None] * n if days is None else days, ids, uris, {
        "top1_label": top1_label, "top1_prob": top1_prob, "top2_label": top2_label, "top2_prob": top2_prob,
        "label_set": label_set, "label_set_size": label_set_size, "ood_score": ood_score, "is_ood": is_ood,
        "error": np.asarray(errors, dtype=object),
    })
