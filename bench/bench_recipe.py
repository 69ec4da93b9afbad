"""The default training recipe vs the frozen-feature probe on the real sample photos (CPU).

    python bench/bench_recipe.py [--folds 5] [--samples DIR] [--synthetic-docs 10]
                                 [--set KEY=VALUE ...] [--head-refit] [--composites] [--quick]
                                 [--loco [CLASS,...]] [--loco-folds N]

Config: the DEFAULT one (only tasks, uploads, ood_sets and partitions set): the two sample
tasks map to the classes normal / defect / dirt (20 photos). Stratified k-fold: each fold's
held-out photos are the test split; the rest is split into train and val as the pipeline
would. The recipe (LP-FT, lib/model/training.py) trains on train and selects its epoch on val;
the probe (logistic regression on frozen efficientnet_lite0 features) fits the same train
split (`probe`) and train + val (`probe_trainval`). Irrelevant images: scikit-image's page
and text images (2) and synthetic documents (lib/data/synthetic.py). Accuracy / macro-F1 pool
the held-out predictions; AUROC is per fold, averaged, for every OOD score (the configured
default is marked). Experiments: ``--set lr=0.01`` overrides one ``train:`` setting;
``--head-refit`` adds ``recipe_head_refit``, the same fine-tuned models with their head refitted
by logistic regression on the fine-tuned train features.

Two states in one photo (issue 26): ``--composites`` combines each fold's held-out defect and
dirt photos (left/right halves, CutMix-style central patch; lib/model/evaluation.py) and reports
every model's top-2 joint hit rate on them beside the joint coverage of the label sets.
Unfamiliar car photos: ``--loco`` leaves each named class (default defect, dirt) out of
training in turn (``--loco-folds`` folds of the rest) and reports, per OOD score and threshold
rule (``tpr``: today's 95 % val TPR; ``between``: lowered towards the synthetic documents,
ood.threshold_between), the share of the left-out class's photos flagged, and the documents'
AUROC and rejected share (the page/text images never set a threshold).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from sofar_assets.config import parse_config  # noqa: E402
from sofar_assets.lib.data import storage, synthetic  # noqa: E402
from sofar_assets.lib.data.images import load_image_array, resize_center_crop  # noqa: E402
from sofar_assets.lib.model.evaluation import cross_validate, leave_one_class_out  # noqa: E402
from sofar_assets.lib.model.models import ModelSpec  # noqa: E402
from sofar_assets.lib.model.training import TrainConfig  # noqa: E402

# ../shared next to the checkout (a worktree sits one level deeper)
DEFAULT_SAMPLES = next((p / "shared/data/sofar-public-samples" for p in REPO.parents[:2]
                        if (p / "shared/data/sofar-public-samples").is_dir()),
                       REPO.parent / "shared/data/sofar-public-samples")
TASKS = {"defect": ("CAR_DEFECT_RECOGNITION", {"0_NORMAL": "normal", "1_DEFECT": "defect"}),
         "dirt": ("CAR_DIRT_RECOGNITION", {"0_NORMAL": "normal", "1_DIRT": "dirt"})}


def default_config(samples: Path, tmp: Path):
    """The config a user writes first: tasks, uploads, ood_sets, partitions — nothing else."""
    return parse_config({
        "tasks": {t: {"folder": str(samples / d), "labels": labels} for t, (d, labels) in TASKS.items()},
        "uploads": {"folder": str(tmp)},
        "ood_sets": {"documents": {"folder": str(tmp)}},
        "partitions": {"start_date": "2026-11-01"},
    }, base_dir=tmp)


def sample_photos(cfg, size: int) -> tuple[list[np.ndarray], list[int]]:
    classes = cfg.vocabulary()
    arrays, labels = [], []
    for task in cfg.tasks.values():
        for folder, label in task.labels.items():
            for f in storage.list_files(str(Path(cfg.resolve(task.folder)) / folder)):
                arrays.append(load_image_array(storage.read_bytes(f), f, size))
                labels.append(classes.index(label))
    return arrays, labels


def irrelevant_images(size: int, n_docs: int) -> dict[str, list[np.ndarray]]:
    from PIL import Image
    from skimage import data

    page_text = [resize_center_crop(Image.fromarray(img).convert("RGB"), size) for img in (data.page(), data.text())]
    docs = [resize_center_crop(synthetic.document(random.Random(1000 + i)), size) for i in range(n_docs)]
    return {"skimage_page_text": page_text, "synthetic_documents": docs}


def table(result: dict, default_score: str) -> str:
    models = list(result["models"])
    lines = [f"| metric | {' | '.join(models)} |", "|---|" + "---:|" * len(models)]
    for key in ("accuracy", "macro_f1"):
        lines.append(f"| {key} | " + " | ".join(f"{result['models'][m][key]:.3f}" for m in models) + " |")
    sets = result["models"]["recipe"]["ood_auroc"]
    for name, methods in sets.items():
        for method in methods:
            vals = [result["models"][m]["ood_auroc"].get(name, {}).get(method, float("nan")) for m in models]
            mark = " (default)" if method == default_score else ""
            lines.append(f"| AUROC {name} / {method}{mark} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def composites_table(result: dict) -> str:
    comp = result["composites"]
    models = list(comp)
    rows = [("images", "images", "{:d}"), ("top-2 joint hit rate", "top2_joint_hit_rate", "{:.3f}"),
            ("label set joint coverage", "label_set_joint_coverage", "{:.3f}"),
            ("label set mean size", "label_set_mean_size", "{:.2f}")]
    lines = [f"| composites (defect + dirt) | {' | '.join(models)} |", "|---|" + "---:|" * len(models)]
    for title, key, fmt in rows:
        lines.append(f"| {title} | " + " | ".join(fmt.format(comp[m][key]) if key in comp[m] else "-"
                                                 for m in models) + " |")
    for kind in comp[models[0]].get("by_kind", {}):
        lines.append(f"| top-2 joint hit rate, {kind} | " + " | ".join(
            f"{comp[m]['by_kind'][kind]:.3f}" for m in models) + " |")
    return "\n".join(lines)


def loco_table(result: dict, default_score: str, sets: list[str]) -> str:
    head = ["score", *(f"AUROC {s}" for s in sets)]
    for rule in ("tpr", "between"):
        head += [f"{rule}: left-out flagged", f"{rule}: ID test flagged", *(f"{rule}: {s} rejected" for s in sets)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, r in result["scores"].items():
        cells = [f"{r[f'auroc/{s}']:.3f}" for s in sets]
        for rule in ("tpr", "between"):
            cells += [f"{r[f'{rule}/left_out_flagged']:.2f}", f"{r[f'{rule}/test_flagged']:.2f}",
                      *(f"{r[f'{rule}/{s}_rejected']:.2f}" for s in sets)]
        mark = " (default)" if method == default_score else ""
        lines.append(f"| {method}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    ap.add_argument("--synthetic-docs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one train: setting (YAML value), e.g. --set lr=0.01; repeatable")
    ap.add_argument("--head-refit", action="store_true",
                    help="also report the recipe with its head refitted by logistic regression on the "
                         "fine-tuned features")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 2 folds, 1 fine-tuning epoch, 2 synthetic documents (no figures)")
    ap.add_argument("--composites", action="store_true",
                    help="top-2 joint hit rate on two-state composites of the held-out defect and dirt photos")
    ap.add_argument("--loco", nargs="?", const="defect,dirt", default=None, metavar="CLASS,...",
                    help="leave each class out of training in turn; flag rate of its photos per OOD score")
    ap.add_argument("--loco-folds", type=int, default=3, help="folds of the remaining photos per left-out class")
    ap.add_argument("--skip-cv", action="store_true", help="only the --loco part")
    args = ap.parse_args(argv)
    if args.quick:
        args.folds, args.synthetic_docs = 2, 2
        args.overrides = [*args.overrides, "epochs=1", "patience=1"]
    if not (args.samples / "CAR_DEFECT_RECOGNITION").is_dir():
        print(f"sample photos not found at {args.samples}; skipped")
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = default_config(args.samples, Path(tmp))
    size = cfg.model.image_size
    arrays, labels = sample_photos(cfg, size)
    ood_arrays = irrelevant_images(size, args.synthetic_docs)
    spec = ModelSpec(num_classes=len(cfg.vocabulary()), arch=cfg.model.arch, backbone=cfg.model.backbone,
                     image_size=size, pretrained=cfg.model.pretrained, pmg_feature_dim=cfg.model.pmg_feature_dim)
    overrides = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.overrides)}
    train = type(cfg.train).model_validate({**cfg.train.model_dump(), **overrides})  # unknown keys: an error
    tcfg = TrainConfig(**{**train.model_dump(), "device": "cpu"})
    print(f"{len(arrays)} photos, classes {cfg.vocabulary()}, OOD sets "
          f"{ {k: len(v) for k, v in ood_arrays.items()} }, default train config {cfg.train.model_dump()}"
          + (f", overridden: {overrides}" if overrides else ""))
    classes = cfg.vocabulary()

    def log(s):
        print(f"[{time.perf_counter() - t0:5.0f} s] {s}", flush=True)

    if not args.skip_cv:
        result = cross_validate(arrays, labels, ood_arrays, spec, tcfg, folds=args.folds,
                                val_fraction=cfg.dataset.val_fraction, knn_k=cfg.ood.knn_k, head_refit=args.head_refit,
                                composite_pair=(classes.index("defect"), classes.index("dirt")) if args.composites
                                else None, label_set_coverage=cfg.conformal.coverage, log=log)
        print(f"\n{args.folds}-fold CV, default config, image size {size}; best epochs per fold "
              f"{result['best_epochs']} (0 = the LP itself)\n")
        print(table(result, cfg.ood.score))
        if args.composites:
            print("\n" + composites_table(result))
    if args.loco:
        left = [classes.index(c.strip()) for c in args.loco.split(",")]
        loco = leave_one_class_out(arrays, labels, ood_arrays, spec, tcfg, left, folds=args.loco_folds,
                                   val_fraction=cfg.dataset.val_fraction, knn_k=cfg.ood.knn_k,
                                   target_tpr=cfg.ood.target_tpr, calibration_set="synthetic_documents", log=log)
        print(f"\nleft out {args.loco}, {args.loco_folds} folds each; thresholds on val, `between` against "
              f"synthetic_documents\n")
        print(loco_table(loco, cfg.ood.score, list(ood_arrays)))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
