"""Resuming on another topology (world size, data-parallel size, TP degree, ZeRO stage) with the
optimizer: DeepSpeed's Universal Checkpointing.

    check_resume(meta, path, dst, sharding)   # in _resume_point: ConfigError if it cannot apply
    where = prepare(path, rank)           # collective: rank 0 converts once, every rank waits
    load(engine, where)                   # engine built with deepspeed_config(load_universal=True)
    state = loader_state_for(rank0_state, dp_rank, dp_size)   # data.sharding=global only

`prepare` runs DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal.main`) on the
checkpoint's `ds/` into `<ckpt>/ds_universal/` (`ds/` + DeepSpeed's `latest_universal`): per
parameter its whole fp32 weight, Adam's exp_avg and exp_avg_sq (TP slices merged by the
`universal_checkpoint_info` that parallel/deepspeed_engine.py records at every save), and the
optimizer's common state. It is written into a temporary sibling and renamed into place, so a
crash leaves no half cache (a stale temporary is removed by the next conversion); a later
resume from the same checkpoint reuses it. It lives inside the checkpoint directory: pruning
removes it with its checkpoint, and completeness (meta.json) does not depend on it.

Two additions to the converter's output, so one cache serves any target:
  - the model-states file (lr schedule, step counters, client state) under both names DeepSpeed
    looks for (`mp_rank_00_model_states.pt` at ZeRO-1/2, `zero_pp_rank_0_mp_rank_00_...` at
    ZeRO-3), once, without the module weights (a universal load never reads them: the weights
    come from the fp32 files). One file for any TP size keeps DeepSpeed's Megatron-specific
    merge/split of model states out of the way (state_dict_factory.MegatronSDLoader).
  - `zero/optimizer_state.pt` of a ZeRO-1/2 checkpoint gets the `optimizer_state_dict` entry
    (step, param groups) that ZeRO-3's universal loader reads.

What DeepSpeed cannot do, refused with a ConfigError naming the checkpoint and a way forward
(`check_resume`): ZeRO-0 on either side (no ZeRO partitions to convert, and the engine loads no
universal state at stage 0), ZeRO-3 -> ZeRO-1/2 (DeepSpeed's ZeRO-3 conversion writes flat
tensors without shapes or steps, which the ZeRO-1/2 loader cannot read), ZeRO-3 with TP > 1
(its universal loader slices TP only for DeepSpeed's AutoTP layers, not megatron-core's), a
checkpoint written before the TP patterns were recorded when either side has TP > 1, and a
data-parallel size change with data.sharding=rank.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from janus_train.checkpoint.sharded import DS_TAG
from janus_train.contracts.errors import ConfigError
from janus_train.parallel.distributed import barrier, broadcast_object

log = logging.getLogger("janus_train")

UNIVERSAL_DIR = "ds_universal"  # inside a checkpoint: DeepSpeed's universal form of its ds/
TMP_PREFIX = ".ds_universal-tmp-"
ZERO12_MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class Topology:
    world_size: int
    dp_size: int
    tp: int
    zero_stage: int

    def describe(self) -> str:
        return f"world size {self.world_size}, {self.dp_size} data-parallel ranks, parallel.tp={self.tp}, parallel.zero_stage={self.zero_stage}"


def topology_of(meta) -> Topology:
    return Topology(meta.world_size, meta.dp_size, meta.tp, meta.zero_stage)


def _refuse(path: Path, src: Topology, dst: Topology, reason: str) -> ConfigError:
    return ConfigError(
        "parallel",
        f"cannot resume {path} on this topology ({dst.describe()}; it was written with {src.describe()}): {reason}. "
        f"Resume it on its own topology (world size {src.world_size}, parallel.tp={src.tp}, parallel.zero_stage={src.zero_stage}), "
        f"or start a new run_dir with model.init_from={path} (its weights; the optimizer and lr schedule restart)",
    )


def check_resume(meta, path: Path, dst: Topology, sharding: str) -> None:
    """Raise a ConfigError when the checkpoint `path` (with `meta`) cannot resume on `dst`:
    the data position (a dp-size change needs data.sharding=global) or the optimizer state
    (what DeepSpeed's universal conversion and loaders support, module docstring). Nothing to
    check for the same topology."""
    src = topology_of(meta)
    if src == dst:
        return
    if src.dp_size != dst.dp_size and sharding != "global":
        raise ConfigError(
            "parallel",
            f"the checkpoint {path} was written with {src.dp_size} data-parallel ranks and this run has {dst.dp_size}: with "
            f"data.sharding={sharding} each rank's data-loader state belongs to its own slice of the data, so it cannot be dealt "
            f"to another number of ranks (data.sharding=global can). Resume with world size / parallel.tp = {src.dp_size}, or "
            f"start a new run_dir with model.init_from={path}",
        )
    if 0 in (src.zero_stage, dst.zero_stage):
        raise _refuse(path, src, dst, "a ZeRO stage 0 run has no ZeRO partitions for DeepSpeed's universal checkpoint to convert or load")
    if src.zero_stage == 3 and dst.zero_stage < 3:
        raise _refuse(path, src, dst, "DeepSpeed converts a ZeRO-3 checkpoint into flat tensors that only its ZeRO-3 loader reads; "
                      "keep parallel.zero_stage=3 (world size, dp size may change)")
    if 3 in (src.zero_stage, dst.zero_stage) and max(src.tp, dst.tp) > 1:
        raise _refuse(path, src, dst, "DeepSpeed's ZeRO-3 universal checkpoint splits tensor-parallel slices only for its own "
                      "AutoTP layers, not megatron-core's (parallel.tp > 1 with parallel.zero_stage=3)")
    ds = path / DS_TAG
    states = sorted(ds.glob("*model_states.pt")) if ds.is_dir() else []
    if not states or not any(ds.glob("*optim_states.pt")):
        raise _refuse(path, src, dst, f"{ds} holds no DeepSpeed model and ZeRO optimizer states to convert")
    if src.tp > 1 or dst.tp > 1:
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

        # mmap: reads the one key, not the weights.
        sd = torch.load(states[0], map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(sd, dict) or UNIVERSAL_CHECKPOINT_INFO not in sd:
            # Without the patterns DeepSpeed would merge (and later split) every parameter along
            # dim 0: wrong for the row-parallel ones, silently where the shapes allow it.
            raise _refuse(path, src, dst, f"it was written before janus-train recorded how tensor parallelism splits each parameter "
                          f"({UNIVERSAL_CHECKPOINT_INFO} in {states[0].name}), which merging or splitting TP slices needs")


def loader_state_for(state: dict[str, Any] | None, dp_rank: int, dp_size: int) -> dict[str, Any] | None:
    """With data.sharding=global every rank's loader state is the same but for the layout's
    dp_rank/dp_size: rank 0's state with those set to this rank's (the loader still checks
    every other layout field)."""
    if state is None:
        return None
    out = dict(state)
    out["layout"] = dict(state["layout"], dp_rank=dp_rank, dp_size=dp_size)
    return out


def _convert(path: Path, out: Path) -> None:
    """Rank 0: `path`/ds -> `out` (= `path`/ds_universal), atomically."""
    from deepspeed.checkpoint import ds_to_universal

    for stale in [*path.glob(TMP_PREFIX + "*"), out]:  # an interrupted conversion; `out` without latest_universal
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    source = _input_view(path / DS_TAG, tmp / "input")
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(tmp / DS_TAG),  # DeepSpeed writes latest_universal ("ds") beside it, in tmp
        num_extract_workers=1,  # in-process: no worker pool forked from a rank of the job
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=False,  # our patterns need not all match (a stage may train no row-parallel weight)
        inject_missing_state=True,  # TP=1 on both sides needs no patterns (check_resume refuses the rest)
    )
    out_text = io.StringIO()
    try:
        with contextlib.redirect_stdout(out_text):
            ds_to_universal.main(args)
        _complete(tmp / DS_TAG, path / DS_TAG)
        shutil.rmtree(source)
    except BaseException:
        log.error("DeepSpeed's ds_to_universal output:\n%s", out_text.getvalue()[-4000:])
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
    tmp.rename(out)


def _without_weights(sd: dict) -> dict:
    """A model-states dict without the module's weights: a universal load never reads them, and
    DeepSpeed 0.19.8's converter would write every module entry it finds as a parameter's fp32
    (failing on megatron-core's `_extra_state` = None entries)."""
    sd = dict(sd)
    sd["module"] = {}
    sd.pop("frozen_param_fragments", None)
    return sd


def _input_view(ds: Path, view: Path) -> Path:
    """`ds` as the converter reads it: links to its files, but the ZeRO-1/2 model-states files
    (`mp_rank_XX_model_states.pt`) rewritten without the module (`_without_weights`)."""
    view.mkdir()
    for f in ds.iterdir():
        if f.is_file() and f.name.startswith("mp_rank_") and f.name.endswith("_model_states.pt"):
            sd = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            torch.save(_without_weights(sd), view / f.name)
            del sd
        else:
            os.symlink(f.resolve(), view / f.name)
    return view


def _complete(tag_dir: Path, source: Path) -> None:
    """The two additions of the module docstring."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    first = source / ZERO12_MODEL_STATES
    if not first.is_file():
        first = source / ZERO3_MODEL_STATES
    sd = _without_weights(torch.load(first, map_location="cpu", weights_only=False, mmap=True))
    sd["mp_world_size"] = 1  # one file for any TP size (DeepSpeed's loader checks the count against it)
    for f in tag_dir.glob("*model_states.pt"):
        f.unlink()
    for name in (ZERO12_MODEL_STATES, ZERO3_MODEL_STATES):
        torch.save(sd, tag_dir / name)
    opt_file = tag_dir / "zero" / "optimizer_state.pt"
    opt = torch.load(opt_file, map_location="cpu", weights_only=False)
    if OPTIMIZER_STATE_DICT not in opt:
        steps = sorted((tag_dir / "zero").glob("*/step.pt"))
        if not steps:
            raise RuntimeError(f"{tag_dir}: no optimizer step recorded (zero/*/step.pt)")
        step = torch.load(steps[0], map_location="cpu", weights_only=False)
        opt[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: opt[PARAM_GROUPS]}
        torch.save(opt, opt_file)


def prepare(path: Path, rank: int) -> Path:
    """Collective. The checkpoint's universal form, converted by rank 0 unless a previous
    resume left it; every rank returns the directory to load (or gets the same error)."""
    out = path / UNIVERSAL_DIR
    error = None
    if rank == 0 and not (out / "latest_universal").is_file():
        log.info("converting %s to DeepSpeed's universal checkpoint format in %s (once per checkpoint)", path / DS_TAG, out)
        try:
            _convert(path, out)
        except Exception as e:  # noqa: BLE001 - every rank reports it as one config error
            error = f"{type(e).__name__}: {e}"
    error = broadcast_object(error)
    if error is not None:
        raise ConfigError(
            "parallel",
            f"cannot resume {path} on another topology: DeepSpeed's conversion to its universal checkpoint failed ({error}). "
            f"Resume it on the topology it was written with, or start a new run_dir with model.init_from={path} "
            f"(its weights; the optimizer and lr schedule restart)",
        )
    barrier()
    return out


def load(engine, where: Path, strict: bool = True) -> None:
    """Weights (fp32 masters and the module's copy), Adam's moments and step, and the lr
    schedule's position from the universal checkpoint `where` (the engine's config has
    checkpoint.load_universal). The optimizer's hyper-parameters other than lr stay the
    configured ones: DeepSpeed's ZeRO-3 loader copies the first param group's onto all
    (weight_decay of the no-decay group included). The caller sets lr from the schedule."""
    opt = engine.lr_scheduler.optimizer if engine.lr_scheduler is not None else engine.optimizer
    kept = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
    loaded, _ = engine.load_checkpoint(str(where), tag=DS_TAG, load_module_strict=strict, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint at {where}/{DS_TAG}")
    sched = engine.lr_scheduler
    if sched is not None and len(getattr(sched, "base_lrs", opt.param_groups)) != len(opt.param_groups):
        raise RuntimeError(f"the checkpoint's lr schedule has {len(sched.base_lrs)} parameter groups and this run's optimizer "
                           f"{len(opt.param_groups)} (training/optim.py param_groups must split the parameters alike at every "
                           f"ZeRO stage)")
    for g, k in zip(opt.param_groups, kept):
        g.update(k)
    # DeepSpeed's ZeRO-3 loader gives every partition the same `step` tensor object, which
    # torch's Adam increments in place: one per partition, or it counts once per partition.
    for st in opt.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
