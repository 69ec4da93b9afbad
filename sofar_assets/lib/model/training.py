"""Training recipe for :class:`~sofar_assets.lib.model.models.SofarNet` (linear head or PMG).

The default recipe converges from a few dozen to a few thousand photos per class:

1. **LP** (linear probe, Kumar et al. ICLR 2022): the ``linear`` head is first fitted by
   logistic regression on the frozen pretrained features (``lib/model/probe.py``); PMG's new heads
   train ``lp_epochs`` with the backbone frozen.
2. **FT**: then everything is fine-tuned (unless ``freeze_backbone``) on augmented training
   images (random-resized crop, flip, mild colour jitter on the uint8 tensors, torch RNG;
   optionally CutMix / mixup across the batch, :class:`BatchMixer`),
   with the backbone's BatchNorm statistics kept (batches of a few photos would overwrite
   ImageNet's), for at most ``epochs`` epochs, stopping after ``patience`` epochs without a
   better validation score.
3. **Selection**: the epoch (the LP result included) with the best val macro-F1, ties broken
   by the lower val loss.

Datasets yield ``(uint8 CHW tensor, int label)`` (as ``images.ImageDataset`` does); batches
travel as uint8 and become [0, 1] floats on the device. The test split never enters here.
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
from torchvision.transforms import v2

from sofar_assets.lib.common.devices import resolve_device
from sofar_assets.lib.model import metrics, probe
from sofar_assets.lib.model.models import ModelSpec, SofarNet, build_model, jigsaw

# PMG's progressive steps: (jigsaw grid, head index, loss weight); None = whole image.
PMG_STEPS: tuple[tuple[int | None, int, float], ...] = ((8, 0, 1.0), (4, 1, 1.0), (2, 2, 1.0), (None, 3, 2.0))


@dataclass
class TrainConfig:
    epochs: int = 20  # a cap: patience usually stops earlier
    batch_size: int = 16
    lr: float = 2e-3
    backbone_lr_factor: float = 0.1  # PMG's ratio; measured on the real photos (README, Model quality)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    freeze_backbone: bool = False
    device: str = "auto"
    num_workers: int = 0
    max_train_batches: int | None = None
    linear_probe: bool | None = None  # LP before FT; None: only when the backbone is fine-tuned
    probe_c: float = 1.0  # inverse L2 strength of the LP logistic regression
    lp_epochs: int = 3  # PMG only: head-only epochs before fine-tuning
    patience: int | None = 3  # None: run all `epochs`
    augment: bool = True
    # mixed-sample training (timm's CutMix / mixup): Beta(alpha, alpha) mixing strengths, 0 = off
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0  # share of FT batches that are mixed (when mixup or cutmix > 0)


@dataclass
class TrainResult:
    model: SofarNet
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_macro_f1: float = float("nan")
    best_val_metrics: dict = field(default_factory=dict)
    images_per_s: float = float("nan")
    data_wait_share: float = float("nan")
    # penultimate features of the (un-augmented) training split under the returned weights,
    # for the feature OOD scores' statistics (ood.fit_feature_stats)
    train_features: np.ndarray | None = None
    train_labels: np.ndarray | None = None


class Augmented(Dataset):
    """Training-split augmentation on the cached uint8 tensors: random-resized crop (scale
    0.5-1), horizontal flip, mild colour jitter. torchvision's v2 transforms draw from torch's
    RNG, which the loader seeds per worker, so a run is reproducible."""

    def __init__(self, ds: Dataset, size: int):
        self.ds = ds
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return self.transform(x), y


class BatchMixer:
    """Mixed-sample training on one batch: CutMix (Yun et al., ICCV 2019) and/or mixup (Zhang
    et al., ICLR 2018) with timm's box and target functions; the batch is mixed with itself
    reversed, as timm's ``Mixup`` does in batch mode (which also works for odd batch sizes,
    where timm's ``Mixup`` refuses). Returns soft targets (N, C) that ``F.cross_entropy`` takes
    as class probabilities, so PMG's progressive steps use them unchanged. With both alphas set,
    each mixed batch is CutMix or mixup with equal chance. Its own seeded RNG: reproducible.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                 seed: int = 0):
        if mixup < 0 or cutmix < 0 or not 0 <= prob <= 1:
            raise ValueError(f"mixup/cutmix alphas must be >= 0 and mix_prob in [0, 1], got {mixup}, {cutmix}, {prob}")
        self.num_classes, self.mixup, self.cutmix, self.prob = num_classes, mixup, cutmix, prob
        self.rng = np.random.default_rng(seed)

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

        if not self.active or x.shape[0] < 2 or self.rng.random() >= self.prob:
            return x, y
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or self.rng.random() < 0.5)
        lam = float(self.rng.beta(*(2 * [self.cutmix if use_cutmix else self.mixup])))
        x = x.clone()
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(x.shape, lam, correct_lam=True)
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        else:
            x = x * lam + x.flip(0) * (1.0 - lam)
        return x, mixup_target(y, self.num_classes, lam)


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
        # Workers live as long as the loader (all epochs): under a run worker they start by
        # spawn/forkserver, and each new worker re-imports torch (seconds per worker per epoch).
        persistent_workers=num_workers > 0,
    )


def make_optimizer(model: SofarNet, cfg: TrainConfig, *, freeze_backbone: bool | None = None) -> torch.optim.SGD:
    """SGD with new layers at ``lr`` and the backbone at ``lr * backbone_lr_factor``.

    A frozen backbone (``cfg.freeze_backbone`` unless overridden) gets ``requires_grad=False``
    and no parameter group.
    """
    frozen = cfg.freeze_backbone if freeze_backbone is None else freeze_backbone
    for p in model.backbone_parameters():
        p.requires_grad_(not frozen)
    groups = [{"params": [p for p in model.head_parameters() if p.requires_grad], "lr": cfg.lr}]
    if not frozen:
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
              mixed_precision: bool = True, features: bool = False):
    """(logits, labels), or (logits, labels, features) with ``features``."""
    model.eval()
    logits, labels, feats = [], [], []
    for x, y in loader:
        with _autocast(device) if mixed_precision else contextlib.nullcontext():
            if features:
                out, f = model.forward_features(to_input(x, device))
                feats.append(f.float().cpu())
            else:
                out = model(to_input(x, device))
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    if not logits:
        empty = (np.zeros((0, 0), np.float32), np.zeros((0,), np.int64))
        return (*empty, np.zeros((0, 0), np.float32)) if features else empty
    out = (torch.cat(logits).numpy().astype(np.float32), torch.cat(labels).numpy().astype(np.int64))
    return (*out, torch.cat(feats).numpy().astype(np.float32)) if features else out


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


def better(candidate: dict, best: dict | None) -> bool:
    """Is ``candidate`` a better epoch than ``best`` (val metric rows)? Higher val macro-F1
    wins; equal F1 goes to the lower val loss (on a small val split F1 saturates early while
    the loss keeps telling epochs apart). A NaN F1 (empty val split) never beats a real one;
    while nothing is measurable the later epoch wins."""
    if best is None:
        return True
    f1, prev = candidate["val_macro_f1"], best["val_macro_f1"]
    if math.isnan(f1) or math.isnan(prev):
        return math.isnan(prev)
    if not math.isclose(f1, prev, rel_tol=0, abs_tol=1e-9):
        return f1 > prev
    loss, prev_loss = candidate["val_loss"], best["val_loss"]
    return not math.isnan(loss) and (math.isnan(prev_loss) or loss < prev_loss)


def _fit_linear_probe(model: SofarNet, train_ds: Dataset, cfg: TrainConfig, device: torch.device,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """LP: logistic regression on the frozen features, copied into ``model.head``."""
    loader = _loader(train_ds, max(cfg.batch_size, 64), shuffle=False, drop_last=False, seed=cfg.seed,
                     num_workers=cfg.num_workers, device=device)
    _, labels, feats = _run_eval(model, loader, device, mixed_precision=False, features=True)
    lp = probe.fit_probe(feats, labels, num_classes, c=cfg.probe_c, seed=cfg.seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(lp.weight).float())
        model.head.bias.copy_(torch.from_numpy(lp.bias).float())
    return feats, labels


def train_classifier(
    spec: ModelSpec,
    train_ds: Dataset,
    val_ds: Dataset,
    cfg: TrainConfig | None = None,
    log: Callable[[str], Any] = print,
    on_epoch: Callable[[dict], Any] | None = None,
) -> TrainResult:
    """Train ``build_model(spec)`` with the recipe of this module; return the best epoch's weights.

    History rows carry ``phase`` (``lp`` or ``ft``); the linear LP is epoch 0. FT uses SGD
    (momentum, weight decay) with new layers at ``lr`` and the backbone at
    ``lr * backbone_lr_factor``, cosine-annealed over ``epochs``. ``linear`` takes one
    cross-entropy step per batch; ``pmg`` takes PMG's four progressive steps per batch (jigsaw
    8 -> head 1, 4 -> head 2, 2 -> head 3, whole image -> concat head with loss x2).
    ``on_epoch`` receives each history row (e.g. for MLflow).
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
    val_loader = _loader(val_ds, max(cfg.batch_size, 64), shuffle=False, drop_last=False, seed=cfg.seed,
                         num_workers=cfg.num_workers, device=device)

    history: list[dict] = []
    best_epoch, best_state, best_metrics = 0, None, None
    totals = {"images": 0, "step_s": 0.0, "wait_s": 0.0}
    t_start = time.perf_counter()

    planned = {"epochs": cfg.epochs}  # the log's denominator: every epoch of every phase (LP + FT)

    def record(row: dict) -> bool:
        nonlocal best_epoch, best_state, best_metrics
        eta = row.pop("eta")
        history.append(row)
        vm = {k: row[k] for k in ("val_loss", "val_acc", "val_macro_f1")}
        improved = better(vm, best_metrics)
        if improved:
            best_epoch, best_state, best_metrics = row["epoch"], copy.deepcopy(model.state_dict()), vm
        log(f"{row['phase']} epoch {row['epoch']}/{planned['epochs']} train_loss {row['train_loss']:.4f} "
            f"val_loss {vm['val_loss']:.4f} val_acc {vm['val_acc']:.4f} val_macro_f1 {vm['val_macro_f1']:.4f} "
            f"{row['images_per_s']:.1f} img/s data_wait {row['data_wait_share']:.0%} ETA {eta}")
        if on_epoch is not None:
            on_epoch(dict(row))
        return improved

    lp_features = lp_labels = None
    epoch = 0
    # Auto (None): LP only ahead of fine-tuning. With a frozen backbone, early-stopped SGD on the
    # head kept the max logit a better OOD score than the converged logistic regression (on the
    # synthetic demo the LP head rejected 25 % of the documents at the 95 % TPR threshold, SGD
    # epochs >= 75 %).
    use_lp = (not cfg.freeze_backbone) if cfg.linear_probe is None else cfg.linear_probe
    if use_lp and spec.arch == "linear":
        t0 = time.perf_counter()
        lp_features, lp_labels = _fit_linear_probe(model, train_ds, cfg, device, spec.num_classes)
        vm = _val_metrics(*_run_eval(model, val_loader, device), spec.num_classes)
        train_loss = F.cross_entropy(model.head(torch.from_numpy(lp_features).to(device)).float().cpu(),
                                     torch.from_numpy(lp_labels)).item()
        elapsed = time.perf_counter() - t0
        record({"epoch": 0, "phase": "lp", "train_loss": train_loss, "train_loss_total": train_loss, **vm,
                "lr": float("nan"), "images_per_s": n_train / elapsed, "data_wait_share": float("nan"),
                "epoch_s": elapsed, "eta": "-"})
        if cfg.freeze_backbone:  # the LP is the optimum of the frozen problem: nothing left to train
            return _result(model, best_state, history, best_epoch, best_metrics, totals, lp_features, lp_labels,
                           train_ds, cfg, device)
    phases: list[tuple[str, int, bool]] = []
    if use_lp and spec.arch == "pmg" and not cfg.freeze_backbone and cfg.lp_epochs > 0:
        phases.append(("lp", cfg.lp_epochs, True))
    phases.append(("ft", cfg.epochs, cfg.freeze_backbone))
    planned["epochs"] = sum(n for _, n, _ in phases)

    fit_ds = Augmented(train_ds, spec.image_size) if cfg.augment else train_ds
    mixer = BatchMixer(spec.num_classes, cfg.mixup, cfg.cutmix, cfg.mix_prob, seed=cfg.seed + 2)
    # A trailing batch of one would crash BatchNorm in train mode (PMG's reference skips
    # short batches for the same reason), so full batches only when there is at least one.
    train_loader = _loader(fit_ds, cfg.batch_size, shuffle=True, drop_last=n_train >= cfg.batch_size,
                           seed=cfg.seed, num_workers=cfg.num_workers, device=device)
    batches_per_epoch = len(train_loader)
    if cfg.max_train_batches is not None:
        batches_per_epoch = min(batches_per_epoch, cfg.max_train_batches)
    for phase, n_epochs, frozen in phases:
        opt = make_optimizer(model, cfg, freeze_backbone=frozen)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_epochs)
        stale = 0
        for phase_epoch in range(1, n_epochs + 1):
            epoch += 1
            t_epoch = time.perf_counter()
            model.train()
            # Frozen: frozen BN statistics too. Fine-tuning: the pretrained BN statistics stay,
            # so the features the LP head was fitted on do not shift under it.
            model.backbone.eval()
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
                if mixer.active:
                    x, y = mixer(x, y)
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
            totals["images"] += n_images
            totals["step_s"] += step_s
            totals["wait_s"] += wait_s
            vm = _val_metrics(*_run_eval(model, val_loader, device), spec.num_classes)
            elapsed = time.perf_counter() - t_start
            improved = record({
                "epoch": epoch, "phase": phase, "train_loss": loss_sum / n_images,
                "train_loss_total": total_sum / n_images, **vm, "lr": lr_now,
                "images_per_s": n_images / step_s if step_s > 0 else float("nan"),
                "data_wait_share": wait_s / step_s if step_s > 0 else float("nan"),
                "epoch_s": time.perf_counter() - t_epoch,
                "eta": _fmt_eta(elapsed / phase_epoch * (n_epochs - phase_epoch)),
            })
            stale = 0 if improved else stale + 1
            if phase == "ft" and cfg.patience and stale >= cfg.patience:
                log(f"early stop: no better val macro-F1 / val loss for {stale} epochs (best: epoch {best_epoch})")
                break
    keep = lp_features if best_epoch == 0 else None  # the LP epoch's backbone is the pretrained one
    return _result(model, best_state, history, best_epoch, best_metrics, totals, keep, lp_labels, train_ds,
                   cfg, device)


def _result(model, best_state, history, best_epoch, best_metrics, totals, features, labels, train_ds,
            cfg: TrainConfig, device) -> TrainResult:
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    if features is None:
        loader = _loader(train_ds, max(cfg.batch_size, 64), shuffle=False, drop_last=False, seed=cfg.seed,
                         num_workers=cfg.num_workers, device=device)
        _, labels, features = _run_eval(model, loader, device, mixed_precision=False, features=True)
    step_s = totals["step_s"]
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_val_macro_f1=best_metrics["val_macro_f1"],
        best_val_metrics={"epoch": best_epoch, **best_metrics},
        images_per_s=totals["images"] / step_s if step_s > 0 else float("nan"),
        data_wait_share=totals["wait_s"] / step_s if step_s > 0 else float("nan"),
        train_features=features,
        train_labels=labels,
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


def predict_logits_and_features(model: SofarNet, dataset: Dataset, batch_size: int = 64, device: str = "auto",
                                num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (N, C), penultimate features (N, D))`` float32, full precision, dataset order."""
    dev = resolve_device(device)
    model.to(dev, memory_format=torch.channels_last)
    loader = _loader(dataset, batch_size, shuffle=False, drop_last=False, seed=0, num_workers=num_workers, device=dev)
    with torch.inference_mode():
        logits, _, feats = _run_eval(model, loader, dev, mixed_precision=False, features=True)
    if logits.shape[0] == 0:
        return np.zeros((0, model.spec.num_classes), np.float32), np.zeros((0, 0), np.float32)
    return logits, feats
