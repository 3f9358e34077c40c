"""Whole model weights out of a training run or one of its checkpoints (convert, stage exports)."""

from __future__ import annotations

from pathlib import Path

import torch

from janus_train.checkpoint.manager import complete_checkpoints, read_meta
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


def read_training_checkpoint(path: str | Path) -> tuple[JanusConfig, dict[str, torch.Tensor], Path]:
    """(config, native state dict, directory holding the tokenizer files)."""
    ckpt = resolve_checkpoint_dir(path)
    model_dir = ckpt / "model"
    if not model_dir.is_dir():
        raise CheckpointError(f"{ckpt}: has no model/ directory")
    cfg, sd = read_checkpoint(model_dir, "native")
    return cfg, sd, model_dir


def export_checkpoint(path: str | Path, out: str | Path, fmt: str = "hf") -> Path:
    """Write a training checkpoint's weights (with its tokenizer files) as a `fmt` checkpoint."""
    cfg, sd, aux = read_training_checkpoint(path)
    return write_checkpoint(out, cfg, sd, fmt=fmt, aux_from=aux)
