"""Checkpoints that hold only sharded state, and their whole weights on demand.

A periodic or signal save must fit a preemption window at 7B on 32 nodes, so it writes what
each rank already holds and nothing else: DeepSpeed's per-rank partitions (`ds/`), and with
train.ema_decay > 0 each rank's slice of the weight average (`ema/rank_NNNNN.pt`). No rank
gathers the model. The checkpoint's `model/` (and `model_ema/`) then hold the config and the
tokenizer files only, with `"weights": "deepspeed"` (or "deepspeed+ema") in config.json; every
reader of a native checkpoint (io.read_checkpoint: convert, eval, chat, init_from) consolidates
such a directory when asked for its weights:

    consolidate_deepspeed(ckpt)   DeepSpeed's own get_fp32_state_dict_from_zero_checkpoint, run
                                  once per tensor-parallel rank (it reads one TP rank's files),
                                  the TP shards concatenated along TP_PLAN's dimension
    consolidate_ema(ckpt)         the same, the trainable tensors replaced by the average's
                                  slices put back together

Stage-end checkpoints still write whole weights (the stage hand-over and the HF export need
them at once).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from janus_train.parallel.tensor_parallel import tp_split_dim

log = logging.getLogger("janus_train")

WEIGHTS_KEY = "weights"  # config.json field of a native directory whose weights live elsewhere
FROM_DEEPSPEED = "deepspeed"  # ../ds (DeepSpeed's tag directory)
FROM_EMA = "deepspeed+ema"  # ../ds for what does not train, ../ema for the average
DS_TAG = "ds"  # DeepSpeed's tag (sub-directory) inside each checkpoint
EMA_SHARDS = "ema"


class ShardedCheckpointError(ValueError):
    pass


def sharded_source(model_dir: str | Path) -> str | None:
    """FROM_DEEPSPEED / FROM_EMA when `model_dir` is such a directory, else None."""
    f = Path(model_dir) / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get(WEIGHTS_KEY)
    except ValueError:
        return None


def mark_sharded(config_json: Path, source: str) -> None:
    """Add the weights' location to a native config.json (written by io.write_checkpoint's
    config writer)."""
    d = json.loads(config_json.read_text())
    d[WEIGHTS_KEY] = source
    config_json.write_text(json.dumps(d, indent=2) + "\n")


# ---- DeepSpeed's shards ---------------------------------------------------------------------
_MP_RANK = re.compile(r"mp_rank_(\d+)")


def _tp_ranks(ds_dir: Path) -> list[int]:
    ranks = sorted({int(m.group(1)) for f in ds_dir.iterdir() if (m := _MP_RANK.search(f.name))})
    if not ranks:
        raise ShardedCheckpointError(f"{ds_dir}: no DeepSpeed model-state files (mp_rank_*) in it")
    return ranks


def _one_tp_rank(ds_dir: Path, tp_rank: int, scratch: Path) -> Path:
    """A view of `ds_dir` with only TP rank `tp_rank`'s files, renamed as rank 0's: DeepSpeed's
    consolidation reads every *_optim_states.pt of a directory as one data-parallel group and
    looks for mp_rank_00's model states."""
    view = scratch / f"tp{tp_rank}" / DS_TAG
    view.mkdir(parents=True)
    tag = f"mp_rank_{tp_rank:02d}"
    for f in ds_dir.iterdir():
        if tag in f.name:
            os.symlink(f.resolve(), view / f.name.replace(tag, "mp_rank_00"))
    (view.parent / "latest").write_text(DS_TAG)
    return view.parent


def _stage0_module(ds_dir: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0 keeps whole weights in the module states (DeepSpeed's consolidation needs ZeRO
    optimizer partitions)."""
    sd = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def _deepspeed_tp_rank(root: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if zero_stage == 0:
        return _stage0_module(root / DS_TAG)
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=DS_TAG)


def merge_tp(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-TP-rank state dicts (native names) -> whole tensors (TP_PLAN's split dimension)."""
    if len(shards) == 1:
        return shards[0]
    out = {}
    for name, first in shards[0].items():
        dim = tp_split_dim(name)
        out[name] = first if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out


def consolidate_deepspeed(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Whole fp32 weights (native names, buffers included) of a training checkpoint, from its
    DeepSpeed shards. Runs in one process, on CPU; holds the whole model once."""
    ckpt = Path(ckpt)
    ds_dir = ckpt / DS_TAG
    if not ds_dir.is_dir():
        raise ShardedCheckpointError(f"{ckpt}: no {DS_TAG}/ directory (DeepSpeed's shards) to consolidate the weights from")
    meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
    zero_stage = int(meta.get("zero_stage", 1))
    ranks = _tp_ranks(ds_dir)
    with tempfile.TemporaryDirectory(prefix="janus-consolidate-") as scratch:
        shards = []
        for t in ranks:
            root = _one_tp_rank(ds_dir, t, Path(scratch)) if len(ranks) > 1 or t != 0 else ckpt
            shards.append(_deepspeed_tp_rank(root, zero_stage))
    return merge_tp(shards)


# ---- the weight average's shards ------------------------------------------------------------
def ema_shard_file(ckpt: Path, rank: int) -> Path:
    return ckpt / EMA_SHARDS / f"rank_{rank:05d}.pt"


def write_ema_shard(ckpt: Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's slice of the average (WeightEMA.shard_state(): flat slices + where they go)."""
    f = ema_shard_file(ckpt, rank)
    f.parent.mkdir(exist_ok=True)
    torch.save(state, f)


def read_ema_shard(ckpt: Path, rank: int) -> dict[str, Any] | None:
    f = ema_shard_file(ckpt, rank)
    return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None


def consolidate_ema_shards(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The average's whole trainable tensors from every rank's slice: within a TP rank the
    data-parallel slices are consecutive pieces of the flat (padded) tensor, in dp order."""
    files = sorted((Path(ckpt) / EMA_SHARDS).glob("rank_*.pt"))
    if not files:
        raise ShardedCheckpointError(f"{ckpt}: no {EMA_SHARDS}/rank_*.pt (the weight average's slices)")
    by_tp: dict[int, dict[int, dict]] = {}
    for f in files:
        s = torch.load(f, map_location="cpu", weights_only=False)
        by_tp.setdefault(int(s["tp_rank"]), {})[int(s["dp_rank"])] = s
    per_tp = []
    for t in sorted(by_tp):
        group = [by_tp[t][d] for d in sorted(by_tp[t])]
        if len(group) != int(group[0]["dp"]):
            raise ShardedCheckpointError(f"{ckpt}: TP rank {t} has {len(group)} weight-average slices, expected {group[0]['dp']}")
        whole = {}
        for name, shape in group[0]["shapes"].items():
            flat = torch.cat([g["shadow"][name].reshape(-1) for g in group])
            whole[name] = flat[: math.prod(shape)].view(shape).clone()
        per_tp.append(whole)
    return merge_tp(per_tp)


def consolidate(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Whole fp32 weights of a sharded model/ or model_ema/ directory (its parent is the checkpoint)."""
    model_dir = Path(model_dir)
    source = sharded_source(model_dir)
    ckpt = model_dir.parent
    if source not in (FROM_DEEPSPEED, FROM_EMA):
        raise ShardedCheckpointError(f"{model_dir}: config.json names no sharded weights ({WEIGHTS_KEY}={source!r})")
    log.info("consolidating the whole weights of %s from DeepSpeed's shards", ckpt)
    sd = consolidate_deepspeed(ckpt)
    if source == FROM_EMA:
        sd.update(consolidate_ema_shards(ckpt))
    return sd
