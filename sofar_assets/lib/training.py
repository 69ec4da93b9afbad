"""Training loop for :class:`~sofar_assets.lib.models.SofarNet` (linear head or PMG).

Datasets yield ``(uint8 CHW tensor, int label)`` (as ``images.ImageDataset`` does); batches
travel as uint8 and become [0, 1] floats on the device. Model selection uses the validation
split's macro-F1 only; the test split never enters this module.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sofar_assets.lib import metrics
from sofar_assets.lib.devices import resolve_device
from sofar_assets.lib.models import ModelSpec, SofarNet, build_model, jigsaw

# PMG's progressive steps: (jigsaw grid, head index, loss weight); None = whole image.
PMG_STEPS: tuple[tuple[int | None, int, float], ...] = ((8, 0, 1.0), (4, 1, 1.0), (2, 2, 1.0), (None, 3, 2.0))


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 16
    lr: float = 2e-3
    backbone_lr_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    freeze_backbone: bool = False
    device: str = "auto"
    num_workers: int = 0
    max_train_batches: int | None = None


@dataclass
class TrainResult:
    model: SofarNet
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_macro_f1: float = float("nan")
    best_val_metrics: dict = field(default_factory=dict)
    images_per_s: float = float("nan")
    data_wait_share: float = float("nan")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NCHW batch -> float [0, 1] on ``device`` in channels_last."""
    x = x.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; propagate that to numpy/random.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _loader(ds: Dataset, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, num_workers: int,
            device: torch.device) -> DataLoader:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=gen,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
    )


def make_optimizer(model: SofarNet, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with new layers at ``lr`` and the backbone at ``lr * backbone_lr_factor``.

    With ``freeze_backbone`` the backbone gets ``requires_grad=False`` and no parameter group.
    """
    if cfg.freeze_backbone:
        for p in model.backbone_parameters():
            p.requires_grad_(False)
    groups = [{"params": [p for p in model.head_parameters() if p.requires_grad], "lr": cfg.lr}]
    if not cfg.freeze_backbone:
        groups.append({"params": list(model.backbone_parameters()), "lr": cfg.lr * cfg.backbone_lr_factor})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_step(model: SofarNet, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               jig_gen: torch.Generator | None, device: torch.device) -> tuple[float, float]:
    """One batch of training; returns (plain CE of the evaluated head, weighted total loss).

    ``linear``: one cross-entropy step. ``pmg``: the four progressive optimizer steps of
    :data:`PMG_STEPS`. Returning Python floats (``.item()``) also synchronizes CUDA, so wall
    clock timings around this call are real.
    """
    if model.spec.arch == "linear":
        opt.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        value = loss.item()
        return value, value
    total = 0.0
    for grid, head, weight in PMG_STEPS:
        opt.zero_grad(set_to_none=True)
        inp = x if grid is None else jigsaw(x, grid, generator=jig_gen)
        with _autocast(device):
            out = model.forward_all(inp)[head]
        ce = F.cross_entropy(out.float(), y)
        (ce * weight).backward()
        opt.step()
        total += weight * ce.item()
    return ce.item(), total  # the last step is the concat head: comparable to val_loss


@torch.no_grad()
def _run_eval(model: nn.Module, loader: DataLoader, device: torch.device, *,
              mixed_precision: bool = True) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with _autocast(device) if mixed_precision else contextlib.nullcontext():
            out = model(to_input(x, device))
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(logits).numpy().astype(np.float32), torch.cat(labels).numpy().astype(np.int64)


def _val_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    if labels.size == 0:
        return {"val_loss": float("nan"), "val_acc": float("nan"), "val_macro_f1": float("nan")}
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    pred = logits.argmax(1)
    return {
        "val_loss": float(loss),
        "val_acc": metrics.accuracy(labels, pred),
        "val_macro_f1": metrics.macro_f1(labels, pred, num_classes),
    }


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_classifier(
    spec: ModelSpec,
    train_ds: Dataset,
    val_ds: Dataset,
    cfg: TrainConfig | None = None,
    log: Callable[[str], Any] = print,
    on_epoch: Callable[[dict], Any] | None = None,
) -> TrainResult:
    """Train ``build_model(spec)`` and return it with the weights of its best validation epoch.

    SGD (momentum, weight decay) with two parameter groups, new layers at ``lr`` and the
    backbone at ``lr * backbone_lr_factor``, cosine-annealed per epoch to 0 over ``epochs``.
    ``linear`` takes one cross-entropy step per batch; ``pmg`` takes PMG's four progressive
    steps per batch (jigsaw 8 -> head 1, 4 -> head 2, 2 -> head 3, whole image -> concat head
    with loss x2). ``on_epoch`` receives each epoch's history row (e.g. for MLflow).
    """
    cfg = cfg or TrainConfig()
    if cfg.epochs < 1:
        raise ValueError("epochs must be >= 1")
    n_train = len(train_ds)
    if n_train < 2:
        raise ValueError(f"need at least 2 training images (BatchNorm), got {n_train}")
    device = resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    jig_gen = torch.Generator().manual_seed(cfg.seed + 1)

    model = build_model(spec).to(device, memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)

    # A trailing batch of one would crash BatchNorm in train mode (PMG's reference skips
    # short batches for the same reason), so full batches only when there is at least one.
    train_loader = _loader(train_ds, cfg.batch_size, shuffle=True, drop_last=n_train >= cfg.batch_size,
                           seed=cfg.seed, num_workers=cfg.num_workers, device=device)
    val_loader = _loader(val_ds, max(cfg.batch_size, 64), shuffle=False, drop_last=False, seed=cfg.seed,
                         num_workers=cfg.num_workers, device=device)
    batches_per_epoch = len(train_loader)
    if cfg.max_train_batches is not None:
        batches_per_epoch = min(batches_per_epoch, cfg.max_train_batches)

    history: list[dict] = []
    best_epoch, best_state, best_metrics = 0, None, {}
    tot_images, tot_step_s, tot_wait_s = 0, 0.0, 0.0
    t_start = time.perf_counter()

    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        if cfg.freeze_backbone:
            model.backbone.eval()  # frozen BN statistics too, not just frozen weights
        lr_now = opt.param_groups[0]["lr"]
        loss_sum = total_sum = 0.0
        n_images = 0
        wait_s = step_s = 0.0
        it = iter(train_loader)
        for _ in range(batches_per_epoch):
            t0 = time.perf_counter()
            try:
                xb, yb = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            x = to_input(xb, device)
            y = torch.as_tensor(yb).to(device, non_blocking=True).long()
            head_loss, total = train_step(model, opt, x, y, jig_gen, device)
            t2 = time.perf_counter()
            wait_s += t1 - t0
            step_s += t2 - t0
            bs = int(x.shape[0])
            n_images += bs
            loss_sum += head_loss * bs
            total_sum += total * bs
        sched.step()
        if n_images == 0:
            raise RuntimeError("the training loader yielded no batch")
        tot_images += n_images
        tot_step_s += step_s
        tot_wait_s += wait_s

        val_logits, val_labels = _run_eval(model, val_loader, device)
        vm = _val_metrics(val_logits, val_labels, spec.num_classes)
        ips = n_images / step_s if step_s > 0 else float("nan")
        elapsed = time.perf_counter() - t_start
        eta = elapsed / epoch * (cfg.epochs - epoch)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / n_images,
            "train_loss_total": total_sum / n_images,
            **vm,
            "lr": lr_now,
            "images_per_s": ips,
            "data_wait_share": wait_s / step_s if step_s > 0 else float("nan"),
            "epoch_s": time.perf_counter() - t_epoch,
        }
        history.append(row)
        f1 = vm["val_macro_f1"]
        prev = best_metrics.get("val_macro_f1", math.nan)
        # Strict '>' keeps the earliest epoch among ties. A NaN score (empty val split) never
        # beats a real one; while nothing is measurable the latest epoch is kept.
        if best_state is None or math.isnan(prev) or (not math.isnan(f1) and f1 > prev):
            best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
            best_metrics = {"epoch": epoch, **vm}
        log(
            f"epoch {epoch}/{cfg.epochs} train_loss {row['train_loss']:.4f} val_loss {vm['val_loss']:.4f} "
            f"val_acc {vm['val_acc']:.4f} val_macro_f1 {f1:.4f} {ips:.1f} img/s "
            f"data_wait {row['data_wait_share']:.0%} ETA {_fmt_eta(eta)}"
        )
        if on_epoch is not None:
            on_epoch(dict(row))

    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_val_macro_f1=best_metrics.get("val_macro_f1", float("nan")),
        best_val_metrics=best_metrics,
        images_per_s=tot_images / tot_step_s if tot_step_s > 0 else float("nan"),
        data_wait_share=tot_wait_s / tot_step_s if tot_step_s > 0 else float("nan"),
    )


def predict_logits(model: nn.Module, dataset: Dataset, batch_size: int = 64, device: str = "auto",
                   num_workers: int = 0) -> np.ndarray:
    """Logits (N, C) float32 for ``dataset`` in its order. Moves ``model`` to the device, eval mode.

    Always full precision, like ``inference.predict_images``: OOD thresholds and evaluation
    computed from these logits must hold for the daily predictions (bf16 shifts max logits).
    """
    dev = resolve_device(device)
    model.to(dev, memory_format=torch.channels_last)
    loader = _loader(dataset, batch_size, shuffle=False, drop_last=False, seed=0, num_workers=num_workers, device=dev)
    with torch.inference_mode():
        logits, _ = _run_eval(model, loader, dev, mixed_precision=False)
    if logits.shape[0] == 0:
        n_out = getattr(getattr(model, "spec", None), "num_classes", 0)
        return np.zeros((0, n_out), np.float32)
    return logits
