"""Whole model weights out of a training run or one of its checkpoints (convert, stage exports)."""

from __future__ import annotations

from pathlib import Path

import torch

from janus_train.checkpoint.adapters import is_lora_checkpoint, read_lora_checkpoint
from janus_train.checkpoint.manager import EMA_DIR, complete_checkpoints, read_meta
from janus_train.models.janus.config import JanusConfig
from janus_train.checkpoint.io import CheckpointError, read_checkpoint, write_checkpoint


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir, or one step_* checkpoint -> the step checkpoint to use."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        found = complete_checkpoints(root) if root.is_dir() else []
        if found:
            return found[-1][1]
    if read_meta(p) is not None:
        return p
    raise CheckpointError(f"{path}: no complete training checkpoint (run dir, checkpoints/ or step_* with meta.json)")


def training_model_dir(path: str | Path) -> Path:
    """The model/ directory of the checkpoint `path` resolves to (whole weights, or LoRA adapters)."""
    ckpt = resolve_checkpoint_dir(path)
    model_dir = ckpt / "model"
    if not model_dir.is_dir():
        raise CheckpointError(f"{ckpt}: has no model/ directory")
    # A run with train.ema_decay > 0: its weight average is the model to use.
    return ckpt / EMA_DIR if (ckpt / EMA_DIR).is_dir() else model_dir


def read_training_checkpoint(path: str | Path, lora_dtype: torch.dtype | None = None) -> tuple[JanusConfig, dict[str, torch.Tensor], Path]:
    """(config, native state dict, directory holding the tokenizer files). A LoRA run's checkpoint
    (adapters + base.json) gives its base's weights with the adapters merged (checkpoint/adapters.py),
    in `lora_dtype` (None: the base's dtypes)."""
    model_dir = training_model_dir(path)
    if is_lora_checkpoint(model_dir):
        cfg, sd = read_lora_checkpoint(model_dir, dtype=lora_dtype)
    else:
        cfg, sd = read_checkpoint(model_dir, "native")
    return cfg, sd, model_dir


def export_checkpoint(path: str | Path, out: str | Path, fmt: str = "hf") -> Path:
    """Write a training checkpoint's weights (with its tokenizer files) as a `fmt` checkpoint."""
    cfg, sd, aux = read_training_checkpoint(path)
    return write_checkpoint(out, cfg, sd, fmt=fmt, aux_from=aux)
