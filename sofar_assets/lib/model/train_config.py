"""The training recipe's settings: ONE pydantic model, the ``train:`` section of the YAML config.

Kept apart from ``training.py`` (which re-exports it) so that parsing a config imports no torch;
``config.py`` uses this model as it is. Every field's ``description`` is its documentation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """The training recipe of ``training.py``: linear probe, then fine-tuning with patience.

    The ``train:`` section of the YAML config (``config.py`` uses this model as it is): unknown
    keys are an error, and a config's recipe is immutable once parsed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(20, ge=1, description="cap on fine-tuning epochs; patience usually stops earlier")
    batch_size: int = Field(16, ge=1, description="training batch size (evaluation batches: at least 64)")
    lr: float = Field(2e-3, gt=0, description="SGD learning rate of the new layers (cosine-annealed)")
    backbone_lr_factor: float = Field(
        0.1, ge=0,
        description="backbone lr = lr * this (PMG's 0.1; measured on the real photos: docs/model-quality.md)")
    momentum: float = Field(0.9, description="SGD momentum")
    weight_decay: float = Field(5e-4, description="SGD weight decay")
    seed: int = Field(0, description="seeds torch, numpy, random, the loaders, jigsaw and the batch mixer")
    freeze_backbone: bool = Field(False, description="train the head(s) only; the backbone stays pretrained")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: in the training process)")
    max_train_batches: int | None = Field(
        None, ge=1, description="cap on training batches per epoch (quick runs, benchmarks); null: all")
    linear_probe: bool | None = Field(
        None, description="LP-FT: fit the head on frozen features first; null: only when fine-tuning")
    probe_c: float = Field(1.0, gt=0, description="inverse L2 strength of the linear probe")
    lp_epochs: int = Field(3, ge=0, description="pmg only: head-only epochs before fine-tuning")
    patience: int | None = Field(
        3, ge=1, description="stop after N epochs without a better val score; null: run all epochs")
    augment: bool = Field(True, description="random-resized crop, flip, colour jitter on the train split")
    # mixed-sample training (timm's CutMix / mixup): Beta(alpha, alpha) mixing strengths, 0 = off
    mixup: float = Field(
        0.4, ge=0,
        description="mixup Beta(alpha, alpha) on fine-tuning batches; 0 = off (docs/model-quality.md)")
    cutmix: float = Field(1.0, ge=0, description="CutMix Beta(alpha, alpha) on fine-tuning batches; 0 = off")
    mix_prob: float = Field(1.0, ge=0, le=1, description="share of batches mixed when mixup or cutmix > 0")
