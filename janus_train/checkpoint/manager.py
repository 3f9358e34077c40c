"""Training checkpoints that survive crashes: complete or invisible, never half.

Layout under `<run_dir>/checkpoints/`:

    step_00000040/            one complete checkpoint (the name is the global step)
      ds/                     DeepSpeed engine state: module, ZeRO-partitioned optimizer, lr schedule
      latest                  "ds": DeepSpeed's tag file, so the zero_to_fp32.py that DeepSpeed copies
                              here works with its default arguments (`python zero_to_fp32.py . out`)
      model/                  janus-train's native format (+ tokenizer files). Stage-end checkpoints:
                              whole fp32 weights (exportable to HF; the hand-over between stages).
                              Periodic and signal saves: config.json only, naming ds/ as the
                              weights (nothing gathered to rank 0 inside a preemption window);
                              readers consolidate them with DeepSpeed's own tool (sharded.py)
      model_ema/              with train.ema_decay > 0: the weight average, same format (exports
                              and samples use it; training continues from model/)
      ema/rank_00000.pt       periodic/signal saves with train.ema_decay > 0: each rank's slice of
                              the average (model_ema/ names them)
      loader/rank_00000.json  each data-parallel rank's loader state (incl. the mixer's)
      rng/rank_00000.pt       each rank's python/numpy/torch RNG states
      meta.json               written last: step, stage, topology, timestamps, the stage's start weights
      ds_universal/           only after a resume on another topology: DeepSpeed's universal form of ds/
                              (checkpoint/universal.py), converted once by rank 0 in a temporary
                              sibling and renamed into place; reused; pruned with its checkpoint
    latest                    name of the newest complete checkpoint (a hint; a scan decides)
    .tmp-step_00000060-XXXX/  a save in progress: never resumed from, removed at next start

A LoRA run (finetune.mode=lora) saves only what trains. Its `model/` holds, instead of whole
weights, peft's adapter directory for our model plus the base's location:

      model/adapter_config.json        peft's LoraConfig (target_modules: a regex over our module names)
      model/adapter_model.safetensors  `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, and
                                       `base_model.model.<component>.<param>` of each module to save
                                       (what `PeftModel.save_pretrained` writes for our model)
      model/base.json                  {"path": <absolute base checkpoint dir>, "format": hf|deepseek|native}
      model/<tokenizer files>

and `ds/` is saved with `exclude_frozen_parameters=True` (no frozen base weights; loaded with
`load_module_strict=False`, the base coming from base.json). checkpoint/adapters.py reads it:
`read_lora_checkpoint(model/)` gives the merged whole weights (base + B @ A x alpha / r, merged by
peft), and every reader of checkpoints (`io.read_checkpoint`) takes such a directory as those.

A save writes everything into the temporary directory, then renames it into place; the rename
is the commit. `kill -9` at any moment leaves either the old set of complete checkpoints or the
new one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from janus_train.checkpoint.consolidate import full_state_dict
from janus_train.checkpoint.adapters import BASE_FILE, is_lora_checkpoint
from janus_train.checkpoint.io import copy_aux_files, write_checkpoint, write_sharded_model_dir
from janus_train.checkpoint.sharded import DS_TAG, FROM_DEEPSPEED, FROM_EMA, write_ema_shard
from janus_train.contracts.faults import fault
from janus_train.parallel.distributed import barrier, broadcast_object

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
EMA_DIR = "model_ema"  # the weight average's whole weights inside a checkpoint


@dataclass(frozen=True)
class LoraSave:
    """What a LoRA run's checkpoint records besides the adapter values."""

    settings: Any  # models.lora.LoraSettings
    base_path: str  # absolute path of the base checkpoint directory
    base_format: str  # hf | deepseek | native
    model_class: type  # the adapted model's class (peft's auto_mapping)


@dataclass
class CheckpointMeta:
    step: int  # global optimizer steps completed (across stages)
    stage: int  # stage index (1..3) these weights belong to
    stage_step: int  # optimizer steps completed within that stage
    stage_steps: int  # the stage's length when saved (whether it is finished: the resuming run's config says)
    world_size: int
    dp_size: int
    tp: int
    zero_stage: int
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    # The whole weights the stage started from (its frozen weights are these; a periodic
    # checkpoint's model/ names DeepSpeed's shards instead). None: the seeded random init.
    stage_start: str | None = None
    time: float = 0.0
    complete: bool = True


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def read_meta(path: Path) -> CheckpointMeta | None:
    f = path / "meta.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
        return CheckpointMeta(**{k: d[k] for k in CheckpointMeta.__dataclass_fields__ if k in d})
    except (ValueError, TypeError, KeyError):
        return None


def complete_checkpoints(root: Path) -> list[tuple[CheckpointMeta, Path]]:
    """Complete checkpoints under root, oldest first."""
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX):
            meta = read_meta(p)
            if meta is not None and meta.complete:
                out.append((meta, p))
    return sorted(out, key=lambda mp: mp[0].step)


def find_resume_checkpoint(resume: str, root: Path) -> tuple[CheckpointMeta, Path] | None:
    """resume=auto: newest complete checkpoint (None if there is none); a path: that one."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if (path / "checkpoints").is_dir():  # a run directory
            found = complete_checkpoints(path / "checkpoints")
            if not found:
                raise FileNotFoundError(f"resume={resume}: no complete checkpoint under {path / 'checkpoints'}")
            return found[-1]
        meta = read_meta(path)
        if meta is None:
            raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no valid meta.json)")
        return meta, path
    found = complete_checkpoints(root)
    return found[-1] if found else None


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, dp_rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.dp_rank = dp_rank

    def clean_partial(self) -> list[str]:
        """Remove leftovers of interrupted saves (rank 0, at start)."""
        removed = []
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX) or (p.is_dir() and p.name.startswith(PREFIX) and read_meta(p) is None):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        barrier()
        return removed

    def save(
        self,
        engine,
        meta: CheckpointMeta,
        loader_state: dict[str, Any] | None,
        model_config,
        aux_dir: Path | None,
        protect: bool = False,
        lora: LoraSave | None = None,
        ema_sd: dict[str, torch.Tensor] | None = None,
        whole: bool = True,
        ema_shard: dict[str, Any] | None = None,
    ) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint path.

        Writes DeepSpeed's engine state (every rank its partition), each rank's loader and RNG
        state, then meta.json, and renames the directory into place. `whole`: also the whole
        fp32 weights in native format with `aux_dir`'s tokenizer files as model/ (gathered to
        rank 0; and `ema_sd`, the weight average, as model_ema/). Otherwise (periodic and signal
        saves) nothing is gathered: model/ names DeepSpeed's shards as its weights and each rank
        writes its `ema_shard` (checkpoint/sharded.py). With `lora`: the adapters (gathered: they
        are small), base.json and no frozen weights anywhere (module docstring).
        """
        whole = whole or lora is not None
        final = self.root / checkpoint_name(meta.step)
        tmp_name = broadcast_object(f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}" if self.rank == 0 else None)
        tmp = self.root / tmp_name
        if self.rank == 0:
            tmp.mkdir(parents=True, exist_ok=False)
        barrier()
        # DeepSpeed's `latest` tag file is written below with meta.json (rank 0), inside the
        # directory that the rename commits.
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=lora is not None)
        # collective; rank 0 holds it
        sd = full_state_dict(engine.module, engine.zero_optimization_stage(), trainable_only=lora is not None) if whole else None
        if not whole and ema_shard is not None:
            write_ema_shard(tmp, self.rank, ema_shard)
        if self.rank == 0:
            slow = fault("save_sleep")
            if slow and int(slow[0]) == meta.step:
                time.sleep(slow[1])
            if not whole:
                write_sharded_model_dir(tmp / "model", model_config, FROM_DEEPSPEED, aux_from=aux_dir)
                if ema_shard is not None:
                    write_sharded_model_dir(tmp / EMA_DIR, model_config, FROM_EMA, aux_from=aux_dir)
            elif lora is None:
                write_checkpoint(tmp / "model", model_config, sd, fmt="native", aux_from=aux_dir)
            else:
                self._write_lora(tmp / "model", lora, sd, aux_dir)
            if whole and ema_sd is not None:
                write_checkpoint(tmp / EMA_DIR, model_config, ema_sd, fmt="native", aux_from=aux_dir)
        del sd
        (tmp / "loader").mkdir(exist_ok=True)
        (tmp / "rng").mkdir(exist_ok=True)
        if loader_state is not None:
            (tmp / "loader" / f"rank_{self.dp_rank:05d}.json").write_text(json.dumps(loader_state))
        torch.save(capture_rng(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
        barrier()
        if self.rank == 0:
            meta.time = time.time()
            meta_dict = asdict(meta)
            meta_dict["protect"] = protect
            (tmp / "latest").write_text(DS_TAG)
            (tmp / "meta.json").write_text(json.dumps(meta_dict, indent=2))
            _fsync_tree(tmp)
            if final.exists():  # same step saved twice (e.g. signal at a stage end): replace
                shutil.rmtree(final)
            tmp.rename(final)
            latest_tmp = self.root / f"{TMP_PREFIX}latest"
            latest_tmp.write_text(final.name + "\n")
            os.replace(latest_tmp, self.root / "latest")
            self._prune()
        barrier()
        return final

    @staticmethod
    def _write_lora(out: Path, lora: LoraSave, trainable_sd: dict[str, torch.Tensor], aux_dir: Path | None) -> None:
        from janus_train.models.lora import adapter_state_dict, write_adapter

        write_adapter(out, lora.settings, adapter_state_dict(trainable_sd, lora.settings), lora.model_class)
        (out / BASE_FILE).write_text(json.dumps({"path": lora.base_path, "format": lora.base_format}, indent=2) + "\n")
        if aux_dir is not None:
            copy_aux_files(aux_dir, out)

    def _prune(self) -> None:
        ckpts = complete_checkpoints(self.root)
        unprotected = [(m, p) for m, p in ckpts if not json.loads((p / "meta.json").read_text()).get("protect")]
        for _, p in unprotected[: max(0, len(unprotected) - self.keep_last)]:
            shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, path: Path, load_optimizer: bool = True) -> None:
        """DeepSpeed state (module + optimizer + schedule) of a same-topology checkpoint. A
        LoRA checkpoint's ds/ lacks the frozen base (already loaded from base.json): not strict."""
        loaded, _ = engine.load_checkpoint(
            str(path),
            tag=DS_TAG,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
            load_module_strict=not is_lora_checkpoint(path / "model"),
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}/ds")

    def loader_state(self, path: Path, dp_rank: int) -> dict[str, Any] | None:
        f = path / "loader" / f"rank_{dp_rank:05d}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def rng_state(self, path: Path, rank: int) -> dict[str, Any] | None:
        f = path / "rng" / f"rank_{rank:05d}.pt"
        # Our own file, but unpickling still runs no foreign code beyond numpy/torch state objects.
        return torch.load(f, weights_only=False) if f.is_file() else None
