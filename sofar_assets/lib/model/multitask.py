"""The paper's multi-task learner: one shared backbone, one linear head per task.

The heads live in an ``nn.ModuleList``. The authors' code kept them in a plain Python list,
so ``model.parameters()`` never returned them: the optimizer did not train them and
``state_dict()`` did not save them. Here they are registered submodules, trained by the same
SGD parameter groups as every other model (:func:`training.make_optimizer`) and saved as
safetensors with a JSON description (:func:`save_multitask` / :func:`load_multitask`).

Targets: each image carries one label index per task, ``-1`` for the tasks it does not belong
to. The loss is the sum over heads of each head's mean cross-entropy over the images of its
task, so an image contributes to the heads of exactly the tasks it belongs to.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sofar_assets.lib.common.devices import resolve_device
from sofar_assets.lib.model import metrics
from sofar_assets.lib.model.models import ModelSpec, create_backbone, read_meta
from sofar_assets.lib.model.training import TrainConfig, make_loader, make_optimizer, to_input

PACKAGE_FORMAT = "sofar-multitask/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "sofar_multitask.json"
IGNORE = -1


class MultiTaskNet(nn.Module):
    """Backbone + one ``nn.Linear`` head per task.

    ``forward`` returns the heads' logits concatenated along dim 1, ``(N, sum(head_sizes))``,
    so the shared prediction helpers (``training.predict_logits``) work unchanged;
    :meth:`split` cuts such an array back into one block per head. ``spec.num_classes`` is
    that total width; ``spec.arch`` must be ``linear`` (the paper's multi-task baseline).
    """

    def __init__(self, spec: ModelSpec, head_sizes: Sequence[int]):
        super().__init__()
        sizes = [int(k) for k in head_sizes]
        if not sizes or min(sizes) < 2:
            raise ValueError(f"every head needs at least 2 classes, got head sizes {sizes}")
        if spec.num_classes != sum(sizes):
            raise ValueError(f"spec.num_classes {spec.num_classes} != sum of head sizes {sum(sizes)}")
        if spec.arch != "linear":
            raise ValueError(f"the multi-task learner has linear heads; got arch {spec.arch!r}")
        self.spec = spec
        self.head_sizes = sizes
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.backbone = create_backbone(spec, num_classes=0, global_pool="avg")
        self.heads = nn.ModuleList(nn.Linear(self.backbone.num_features, k) for k in sizes)

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone((x - self.mean) / self.std)
        return [head(feats) for head in self.heads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.forward_heads(x), dim=1)

    def split(self, logits: np.ndarray) -> list[np.ndarray]:
        """``(N, sum(head_sizes))`` logits -> one ``(N, K_t)`` block per head."""
        arr = np.asarray(logits)
        if arr.ndim != 2 or arr.shape[1] != sum(self.head_sizes):
            raise ValueError(f"expected (N, {sum(self.head_sizes)}) logits, got shape {arr.shape}")
        return np.split(arr, np.cumsum(self.head_sizes)[:-1], axis=1)

    def backbone_parameters(self):
        return self.backbone.parameters()

    def head_parameters(self):
        return self.heads.parameters()


class MultiTaskDataset(Dataset):
    """Wraps an image dataset (whose own labels are ignored) with per-task targets ``(N, T)``."""

    def __init__(self, images: Dataset, targets: np.ndarray):
        t = np.asarray(targets, dtype=np.int64)
        if t.ndim != 2 or t.shape[0] != len(images):
            raise ValueError(f"targets must be ({len(images)}, T), got shape {t.shape}")
        self.images, self.targets = images, torch.from_numpy(t)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x, _ = self.images[i]
        return x, self.targets[i]


def multitask_loss(head_logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy over the images of that head's task.

    ``targets`` is ``(N, T)`` with :data:`IGNORE` where an image is not part of task ``t``; a
    head without any image of its task in the batch adds nothing.
    """
    total = head_logits[0].new_zeros((), dtype=torch.float32)
    for t, logits in enumerate(head_logits):
        mask = targets[:, t] != IGNORE
        if mask.any():
            total = total + F.cross_entropy(logits[mask].float(), targets[mask, t])
    return total


def mean_task_macro_f1(head_logits: Sequence[np.ndarray], targets: np.ndarray) -> float:
    """Validation score for model selection: the mean over heads of macro-F1 on their own images."""
    scores = []
    for t, logits in enumerate(head_logits):
        mask = targets[:, t] != IGNORE
        if mask.any():
            scores.append(metrics.macro_f1(targets[mask, t], logits[mask].argmax(1), logits.shape[1]))
    finite = [s for s in scores if not math.isnan(s)]
    return float(np.mean(finite)) if finite else float("nan")


@dataclass
class MultiTaskResult:
    model: MultiTaskNet
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_score: float = float("nan")


@torch.no_grad()
def _val_logits(model: MultiTaskNet, loader: DataLoader, device: torch.device) -> tuple[list[np.ndarray], np.ndarray]:
    model.eval()
    outs, ys = [], []
    for x, y in loader:
        outs.append(model(to_input(x, device)).float().cpu())
        ys.append(y)
    if not outs:
        return [np.zeros((0, k), np.float32) for k in model.head_sizes], np.zeros((0, len(model.head_sizes)), np.int64)
    return model.split(torch.cat(outs).numpy()), torch.cat(ys).numpy()


def train_multitask(
    spec: ModelSpec,
    head_sizes: Sequence[int],
    train_ds: MultiTaskDataset,
    val_ds: MultiTaskDataset,
    cfg: TrainConfig,
    log: Callable[[str], Any] = print,
) -> MultiTaskResult:
    """Train :class:`MultiTaskNet` with the champion's optimizer settings and keep the best epoch.

    SGD parameter groups from :func:`training.make_optimizer` (heads at ``lr``, backbone at
    ``lr * backbone_lr_factor``, or frozen), cosine-annealed per epoch; loss
    :func:`multitask_loss`; best epoch by :func:`mean_task_macro_f1` on the val split.
    Full precision on every device (a baseline, not the production path).
    """
    if cfg.epochs < 1:
        raise ValueError("epochs must be >= 1")
    if len(train_ds) < 2:
        raise ValueError(f"need at least 2 training images (BatchNorm), got {len(train_ds)}")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = MultiTaskNet(spec, head_sizes).to(device, memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    train_loader = make_loader(train_ds, cfg.batch_size, shuffle=True,
                               drop_last=len(train_ds) >= cfg.batch_size, seed=cfg.seed,
                               num_workers=cfg.num_workers, device=device)
    val_loader = make_loader(val_ds, max(cfg.batch_size, 64), shuffle=False, drop_last=False, seed=cfg.seed,
                             num_workers=cfg.num_workers, device=device)
    history: list[dict] = []
    best_epoch, best_state, best_score = 0, None, math.nan
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if cfg.freeze_backbone:
            model.backbone.eval()
        loss_sum, n = 0.0, 0
        for xb, yb in train_loader:
            x, y = to_input(xb, device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            loss = multitask_loss(model.forward_heads(x), y)
            if loss.requires_grad:  # a batch whose images belong to no task has nothing to learn
                loss.backward()
                opt.step()
            loss_sum += loss.item() * len(xb)
            n += len(xb)
        sched.step()
        val_heads, val_y = _val_logits(model, val_loader, device)
        score = mean_task_macro_f1(val_heads, val_y)
        row = {"epoch": epoch, "train_loss": loss_sum / max(n, 1), "val_mean_task_macro_f1": score,
               "epoch_s": time.perf_counter() - t0}
        history.append(row)
        log(f"multi-task epoch {epoch}/{cfg.epochs} train_loss {row['train_loss']:.4f} "
            f"val mean task macro-F1 {score:.4f}")
        if best_state is None or math.isnan(best_score) or (not math.isnan(score) and score > best_score):
            best_epoch, best_score, best_state = epoch, score, copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return MultiTaskResult(model=model, history=history, best_epoch=best_epoch, best_val_score=best_score)


def save_multitask(model: MultiTaskNet, directory: str | Path, tasks: Sequence[str],
                   head_labels: Sequence[Sequence[str]]) -> Path:
    """Write ``model.safetensors`` (backbone AND heads) + ``sofar_multitask.json``."""
    from safetensors.torch import save_file

    if len(tasks) != len(model.head_sizes) or [len(h) for h in head_labels] != model.head_sizes:
        raise ValueError(f"tasks/head_labels do not match the heads {model.head_sizes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": PACKAGE_FORMAT})
    meta = {"format": PACKAGE_FORMAT, "spec": model.spec.to_dict(), "tasks": list(tasks),
            "head_labels": [list(h) for h in head_labels]}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def load_multitask(directory: str | Path) -> tuple[MultiTaskNet, dict]:
    """Rebuild a saved :class:`MultiTaskNet` (eval mode, CPU); every tensor must match (strict)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_meta(directory / META_FILE, PACKAGE_FORMAT, "sofar multi-task package")
    spec = ModelSpec.from_dict({**meta["spec"], "pretrained": False})
    model = MultiTaskNet(spec, [len(h) for h in meta["head_labels"]])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    model.eval()
    return model, meta
