"""The training run: stages in order, each a DeepSpeed engine over a freshly frozen model.

    run(cfg) -> exit code

Per stage: build the model from the previous stage's (or the init) weights, apply the stage's
freeze rules, build AdamW + warmup/constant schedule, wrap in DeepSpeed, stream the stage's
data mix, and loop `train_step`. Checkpoints every N steps, at the stage end (plus an HF
export), and when SIGTERM/SIGUSR1 arrives. `resume=auto` continues from the newest complete
checkpoint, bit for bit when the topology is unchanged. A stage is finished when its checkpoint
reached the stage's *configured* length: raising `train.stages.stageN.steps` of the newest
checkpoint's stage continues it to the new length (and re-exports it at the new end).

With `finetune.mode=lora` every stage injects peft's LoRA adapters into the base weights
(`model.init_from`), trains only them and `finetune.lora.modules_to_save` (the stages'
`trainable` lists are ignored), checkpoints the adapters (checkpoint/manager.py) and exports
merged whole weights; a later stage continues the same adapters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from janus_train.checkpoint.manager import (EMA_DIR, CheckpointManager, CheckpointMeta, LoraSave, complete_checkpoints, find_resume_checkpoint,
                                            restore_rng)
from janus_train.logging.metrics import MetricsFile, StepRecord
from janus_train.logging.mfu import component_sizes, device_peak_flops, step_flops
from janus_train.models.janus.config import JanusConfig
from janus_train.models.janusflow.config import JanusFlowConfig
from janus_train.checkpoint.adapters import is_lora_checkpoint, read_base, read_lora_checkpoint
from janus_train.checkpoint import universal
from janus_train.checkpoint.consolidate import set_master_weights
from janus_train.checkpoint.sharded import read_ema_shard, sharded_source
from janus_train.checkpoint.export import export_checkpoint
from janus_train.checkpoint.io import detect_format, load_state_into, load_tokenizer, read_checkpoint, read_config, release_pages
from janus_train.contracts.faults import fault
from janus_train.parallel import deepspeed_engine as dse
from janus_train.parallel.distributed import DistInfo, all_reduce_max, barrier, destroy, init_distributed, set_cpu_threads
from janus_train.training.config import ConfigError, RunConfig, StageSettings, validate_config
from janus_train.training.optim import build_optimizer
from janus_train.training.signals import StopFlag
from janus_train.training.stages import apply_freeze
from janus_train.training.step import train_step

log = logging.getLogger("janus_train")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_ABORTED = 0, 1, 2, 3
# Model-config fields that say how to train, not what the weights are (JanusFlow's flow section):
# a run may set them differently from its init checkpoint.
TRAINING_SETTINGS = ("repa_weight", "t_logit_mean", "t_logit_std")


class TrainingAborted(RuntimeError):
    pass


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: allocated device memory on a GPU, else the peak
    resident set size (the host is the device)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def resident_gib(device: torch.device) -> float:
    """Memory in use now (the baseline start-up figures are measured above)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class Trainer:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo, mpu=None):
        self.cfg = cfg
        self.dist = dist_info
        self.stages = cfg.enabled_stages()
        self.mpu = mpu
        self.tp = cfg.parallel.tp
        if mpu is not None:
            self.dp_size, self.dp_rank, self.dp_group = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank(), mpu.get_data_parallel_group()
        else:
            self.dp_size, self.dp_rank, self.dp_group = dist_info.world_size, dist_info.rank, None
        self.zero_stage = cfg.parallel.zero_stage
        self.run_dir = Path(cfg.run_dir)
        self.dtype = dse.resolve_dtype(cfg.parallel.dtype, dist_info.device)
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, dist_info.rank, self.dp_rank)
        self.stop = StopFlag
        self.callbacks: list = []
        self.engine = None
        self.loader = None
        self.current_stage: StageSettings | None = None
        self.family = cfg.model.family
        self.last_checkpoint: Path | None = None
        self.evaluation = None  # training.evaluation.TrainingEvaluation when eval.data is set
        self.ema = None  # training.ema.WeightEMA of the stage when train.ema_decay > 0
        self.global_step = 0
        self.stage_step = 0
        self.bad_in_row = 0
        self.skipped_steps = 0
        self.model_config = self._model_config()
        self.loss_groups = self.family.loss_groups(dict(cfg.train.loss_weights), self.model_config)
        self.sizes = component_sizes(self.model_config)
        self.peak = device_peak_flops(dist_info.device, cfg.logging.peak_flops)
        self.tokenizer_dir = self._tokenizer_dir()
        self.tokenizer = None
        self.lora = cfg.finetune.lora.settings() if cfg.finetune.is_lora else None
        self.lora_base: tuple[str, str] | None = None  # (path, format) of the weights the adapters sit on
        # The newest stage's start-up memory (max over ranks, GiB; status.json, and the start-up
        # line of tools/memory_plan.py to check against): before the model, with its weights
        # loaded, with the DeepSpeed engine (optimizer states) built.
        self.startup_memory: dict[str, float] = {}
        self.stage_start: str | None = None  # the whole weights the current stage started from (CheckpointMeta.stage_start)

    # ---- setup -----------------------------------------------------------------------------
    def _model_config(self) -> JanusConfig | JanusFlowConfig:
        m = self.cfg.model
        cfg = m.model_config_for()
        init = self._init_dir()
        if init is not None and is_lora_checkpoint(init):
            if self.cfg.finetune.is_lora:
                raise ConfigError("model.init_from", f"{m.init_from} is a LoRA run's checkpoint (adapters + base.json): "
                                  "merge it into whole weights first (convert) and adapt those, or resume that run")
            init = read_base(init)[0]  # full fine-tuning from its merged weights (_build_model)
        if init is not None:
            stored = read_config(init)
            if type(stored) is not type(cfg):
                raise ConfigError("model.preset", f"{m.preset} is a {self.family.name} preset but model.init_from={m.init_from} "
                                  f"holds a {type(stored).__name__} checkpoint")
            for part in ("llm", "vision", "flow" if self.family.gen_kind == "flow" else "vq"):
                a, b = getattr(stored, part), getattr(cfg, part)
                for field in a.__dataclass_fields__:
                    if field in TRAINING_SETTINGS:
                        continue  # how to train, not what the weights are: the run's own
                    if getattr(a, field) != getattr(b, field):
                        raise ConfigError(
                            "model.preset",
                            f"{m.preset} has {part}.{field}={getattr(b, field)!r} but model.init_from={m.init_from} "
                            f"holds {getattr(a, field)!r} (pick the matching preset or override it in model.overrides)",
                        )
            if hasattr(stored, "image_token_id"):
                cfg.image_token_id = stored.image_token_id
        return cfg

    def _init_dir(self) -> Path | None:
        init = self.cfg.model.init_from
        if init is None:
            return None
        p = Path(init)
        if (p / "checkpoints").is_dir() or (p / "meta.json").is_file():
            from janus_train.checkpoint.export import resolve_checkpoint_dir

            return resolve_checkpoint_dir(p) / "model"
        return p

    def _tokenizer_dir(self) -> Path:
        tok = self.cfg.data.tokenizer
        if tok is not None:
            return Path(tok)
        init = self._init_dir()
        if init is None:
            raise ConfigError("data.tokenizer", "no tokenizer: set data.tokenizer or model.init_from (a checkpoint with tokenizer files)")
        return init

    def _partitioned_start(self) -> bool:
        """Whether the stage's model is created partitioned (ZeRO-3 without TP or LoRA, which
        reshape the model after it is built)."""
        return self.zero_stage == 3 and self.tp == 1 and self.lora is None

    def _build_model(self, weights_dir: Path | None, ds_cfg: dict):
        """(model, its whole fp32 weights as read, the LoRA adapter state to continue or None).
        A LoRA checkpoint's model/ is its base + adapters: LoRA runs get both apart, full
        fine-tuning gets them merged.

        Nothing holds the whole model in fp32 unless the run trains in fp32: the model is cast
        on the meta device before it gets memory, and the weights are read as views of the
        files' memory maps (pages read on use). Under ZeRO-3 (`_partitioned_start`) parameters
        are created partitioned and each rank copies only its slices (parallel/zero3_init.py)."""
        if self._partitioned_start():
            return self._build_partitioned(weights_dir, ds_cfg)
        with torch.device("meta"):
            model = self.family.build(self.model_config)
        model = model.to(self.dtype).to_empty(device=self.dist.device)
        sd = adapter_sd = None
        if weights_dir is not None and is_lora_checkpoint(weights_dir):
            if self.lora is not None:
                from janus_train.models.lora import read_adapter

                base, fmt = read_base(weights_dir)
                _, adapter_sd = read_adapter(weights_dir)
                _, sd = read_checkpoint(base, fmt)
                self.lora_base = (str(base), fmt or "auto")
            else:
                _, sd = read_lora_checkpoint(weights_dir, dtype=torch.float32)
        elif weights_dir is not None:
            fmt = detect_format(weights_dir)
            _, sd = read_checkpoint(weights_dir, fmt, mmap=True)
            self.lora_base = (str(Path(weights_dir).resolve()), fmt)  # what a LoRA run's base.json names
        if sd is not None:
            if self.family.gen_kind == "flow":
                # A release has no REPA projector: it starts fresh (seeded), then the weights
                # the checkpoint has overwrite everything else.
                model.init_training_only(seed=self.cfg.seed)
            load_state_into(model, sd)
            for t in sd.values():
                release_pages(t)  # the copies are in the model; the file's pages may go
        else:
            model.init_weights(seed=self.cfg.seed)
        model.train()
        if self.family.gen_kind == "vq":
            model.vq.eval()  # frozen; keep it in inference mode
        return model, sd, adapter_sd

    def _build_partitioned(self, weights_dir: Path | None, ds_cfg: dict):
        from janus_train.models.janusflow.config import TRAINING_ONLY
        from janus_train.parallel.zero3_init import build_partitioned, load_partitioned, zero3_gathered

        model = build_partitioned(lambda: self.family.build(self.model_config), ds_cfg, self.dtype, self.mpu)
        sd = None
        if weights_dir is not None:
            if is_lora_checkpoint(weights_dir):
                _, sd = read_lora_checkpoint(weights_dir, dtype=torch.float32)
            else:
                _, sd = read_checkpoint(weights_dir, detect_format(weights_dir), mmap=True)
            optional = TRAINING_ONLY if self.family.gen_kind == "flow" else ()
            if load_partitioned(model, sd, optional=optional, release=release_pages):
                # A release has no REPA projector: it starts fresh (seeded).
                model.init_training_only(seed=self.cfg.seed, gathered=zero3_gathered)
        else:
            model.init_weights(seed=self.cfg.seed, gathered=zero3_gathered)
        model.train()
        if self.family.gen_kind == "vq":
            model.vq.eval()
        return model, sd, None

    def _data_config(self, stage: StageSettings):
        from janus_train.data.config import DataConfig

        d = self.cfg.data.model_dump(exclude={"root"})
        d.update(stage.sources)
        d.update(
            ratio=list(stage.ratio),
            ratio_phases=[[u, list(r)] for u, r in stage.ratio_phases],
            global_batch=stage.global_batch,
            micro_batch_rows=self.cfg.train.micro_batch_rows,
            tokenizer=str(self.tokenizer_dir),
            # A different order per stage, reproducible from the run's seed.
            seed=self.cfg.data.seed + 1000 * stage.index,
        )
        return DataConfig.from_dict(d)

    def _build_loader(self, stage: StageSettings, state: dict | None, ckpt: Path | None = None):
        from janus_train.data.loader import build_train_loader

        loader = build_train_loader(self._data_config(stage), self.tokenizer, self.model_config, self.dp_rank, self.dp_size)
        if state is not None:
            try:
                loader.load_state_dict(state)
            except ValueError as e:
                # The loader's position is only meaningful for the data it was saved with.
                loader.close()
                raise ConfigError(
                    "data",
                    f"cannot resume the data stream from {ckpt}: {e}. The data settings changed since that checkpoint. "
                    f"Put them back to resume this run, or train on the new data from its weights in a new run_dir "
                    f"(run_dir=<new> model.init_from={ckpt})",
                ) from None
        return loader

    def _setup_callbacks(self) -> None:
        from janus_train.logging.progress import ProgressBar
        from janus_train.logging.samples import SampleGrids

        lg = self.cfg.logging
        wandb_cb = None
        if self.dist.is_main:
            # The run continues from global_step (the resumed checkpoint's, or 0): the metrics of
            # later steps (run before a crash) are dropped, and will be logged again as they rerun.
            self.callbacks.append(MetricsFile(self.run_dir, resume_step=self.global_step))
            if lg.wandb.enabled and lg.wandb.mode != "disabled":
                from janus_train.logging.wandb_logger import WandbLogger

                wandb_cb = WandbLogger(self.run_dir, lg.wandb.project, lg.wandb.mode, lg.wandb.entity, lg.wandb.name, self.cfg.model_dump(),
                                       resume_step=self.global_step)
                self.callbacks.append(wandb_cb)
            if lg.progress:
                self.callbacks.append(ProgressBar())
        if self.cfg.eval.data is not None:
            from janus_train.training.evaluation import TrainingEvaluation

            # Held-out und prompts as training renders them, unless eval.data says otherwise.
            section = self.cfg.eval.model_copy(update={"data": self.cfg.eval.data.following(self.cfg.data.und_system_prompt)})
            self.evaluation = TrainingEvaluation(section, self.run_dir, self.tokenizer, wandb_cb, vae_path=self.cfg.model.vae)
        if lg.sample_every:
            self.callbacks.append(SampleGrids(self.run_dir, lg.sample_every, list(lg.sample_prompts), lg.sample_num, lg.sample_cfg, lg.sample_seed,
                                              self.tokenizer, wandb_cb, vae_path=self.cfg.model.vae))

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def write_status(self, state: str, message: str = "") -> None:
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stage = self.current_stage
        status = {
            "state": state,
            "step": self.global_step,
            "stage": stage.index if stage else None,
            "stage_step": self.stage_step,
            "skipped_steps": self.skipped_steps,
            "world_size": self.dist.world_size,
            "tp": self.tp,
            "startup_memory": self.startup_memory,
            "time": time.time(),
            "message": message,
        }
        tmp = self.run_dir / ".status.json.tmp"
        tmp.write_text(json.dumps(status, indent=2) + "\n")
        os.replace(tmp, self.run_dir / "status.json")

    # ---- the run ---------------------------------------------------------------------------
    def run(self) -> str:
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.stop.install()
        removed = self.ckpt.clean_partial()
        if removed and self.dist.is_main:
            log.warning("removed incomplete checkpoint writes: %s", removed)
        resume = self._resume_point()
        self._setup_callbacks()
        self.write_status("running")
        self._call("on_run_start")
        weights_dir = self._init_dir()
        first = self._first_stage_index(resume)
        trained = False
        for stage in self.stages:
            if stage.index < first:
                continue
            ckpt_state = None
            if resume is not None:
                meta, path = resume
                weights_dir = path / "model"
                resume = None
                if meta.stage == stage.index:
                    if meta.stage_step >= stage.steps:
                        # Finished at the stage's configured length: the next stage starts from
                        # these weights (a longer train.stages.stageN.steps continues it instead).
                        self.last_checkpoint = path
                        continue
                    ckpt_state = (meta, path)
            trained = True
            state = self._run_stage(stage, weights_dir, ckpt_state)
            if state != "completed":
                return state
            weights_dir = self.last_checkpoint / "model"
        if not trained and self.dist.is_main:
            log.info("nothing to train: every stage of the schedule is finished at its configured length (step %d); raise "
                     "train.stages.stageN.steps to train longer, or use a new run_dir", self.global_step)
        return "completed"

    def _resume_point(self):
        found = find_resume_checkpoint(self.cfg.resume, self.ckpt.root)
        if self.cfg.resume == "none" and self.ckpt.root.is_dir() and any(self.ckpt.root.glob("step_*")):
            raise ConfigError("resume", f"resume=none but {self.ckpt.root} holds checkpoints; use resume=auto or a new run_dir")
        if found is not None:
            meta, path = found
            # Another topology resumes through DeepSpeed's universal checkpoint (_run_stage):
            # refuse here what it cannot do, before anything is built.
            universal.check_resume(meta, path, self._topology(), self.cfg.data.sharding)
            if is_lora_checkpoint(path / "model") != (self.lora is not None):
                kind = "a LoRA run's (adapters + base.json)" if is_lora_checkpoint(path / "model") else "a full fine-tuning run's"
                raise ConfigError("finetune.mode", f"{self.cfg.finetune.mode}, but the checkpoint to resume ({path}) is {kind}: "
                                  f"resume with the finetune.mode it was written with, or start a new run_dir with model.init_from")
            self._check_finished_stages(meta, path)
            self.global_step = meta.step
            self.skipped_steps = meta.skipped_steps
            # status.json shows where the run stands from the start, not "stage": null.
            self.current_stage = next((s for s in self.stages if s.index == meta.stage), None)
            self.stage_step = meta.stage_step
            if self.dist.is_main:
                configured = self.current_stage.steps if self.current_stage is not None else meta.stage_steps
                log.info("resuming from %s (stage %d, step %d/%d in stage)", path, meta.stage, meta.stage_step, configured)
        return found

    def _topology(self) -> universal.Topology:
        return universal.Topology(self.dist.world_size, self.dp_size, self.tp, self.zero_stage)

    def _check_finished_stages(self, meta: CheckpointMeta, path: Path) -> None:
        """An earlier stage that a later one has trained from cannot change its length: refuse a
        config whose steps differ from what that stage ran (its stage-end checkpoint says)."""
        ended = {m.stage: (m, p) for m, p in complete_checkpoints(path.parent) if m.stage < meta.stage and m.stage_step >= m.stage_steps}
        for s in self.stages:
            if s.index not in ended or s.index >= meta.stage:
                continue
            m, p = ended[s.index]
            if m.stage_step != s.steps:
                raise ConfigError(
                    f"train.stages.{s.name}.steps",
                    f"{s.steps}, but stage {s.index} of this run ended after {m.stage_step} steps ({p}) and stage {meta.stage} has "
                    f"trained from its weights since ({path}): a finished stage followed by another cannot change length. Set it "
                    f"back to {m.stage_steps}, or train stage {s.index} longer in a new run_dir with resume={p}",
                )

    def _first_stage_index(self, resume) -> int:
        requested = self.cfg.stage
        if resume is None:
            return requested or self.stages[0].index
        meta = resume[0]
        if requested is not None and requested < meta.stage:
            raise ConfigError("stage", f"stage={requested} but the checkpoint to resume is already in stage {meta.stage}; use a new run_dir or resume=none")
        return max(requested or meta.stage, meta.stage)

    def _run_stage(self, stage: StageSettings, weights_dir: Path | None, ckpt_state) -> str:
        self.current_stage = stage
        self.stage_step = ckpt_state[0].stage_step if ckpt_state is not None else 0
        self.write_status("running")
        cfg = self.cfg
        same_topology = False
        if ckpt_state is not None:
            meta = ckpt_state[0]
            same_topology = universal.topology_of(meta) == self._topology()
        # Same initial RNG on every rank for a fresh stage (restored below on resume).
        baseline = resident_gib(self.dist.device)
        seed = cfg.seed + stage.index
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if ckpt_state is None:
            start = weights_dir
        else:
            meta = ckpt_state[0]
            start = Path(meta.stage_start) if meta.stage_start else self._stage_start_weights(stage, ckpt_state[1].parent)
            if weights_dir is not None and sharded_source(weights_dir) is not None:
                # A periodic save holds DeepSpeed's shards only, and the engine's load below
                # fills the trained weights (from them, or from their universal form on another
                # topology): build from what the stage started from, whose frozen weights are
                # the checkpoint's (DeepSpeed's ZeRO-3 load restores only what its optimizer
                # holds). Consolidating the shards here would hold the whole model on every rank.
                weights_dir = start
        self.stage_start = str(Path(start).resolve()) if start is not None else None
        gas = stage.global_batch // (self.dp_size * cfg.train.micro_batch_rows)
        ds_cfg = dse.deepspeed_config(self.zero_stage, cfg.train.micro_batch_rows, gas, self.dp_size, cfg.train.grad_clip, self.dtype,
                                      load_universal=ckpt_state is not None and not same_topology)
        model, full_sd, adapter_sd = self._build_model(weights_dir, ds_cfg)
        if self.tp > 1:
            from janus_train.parallel.tensor_parallel import apply_tensor_parallel

            model = apply_tensor_parallel(model, self.mpu)
        if cfg.model.head_chunk_tokens:
            from janus_train.parallel.chunked_loss import apply_chunked_head_loss

            apply_chunked_head_loss(model, cfg.model.head_chunk_tokens)
        if self.lora is not None:
            from janus_train.models.lora import apply_lora, exact_trainable, load_adapter_state

            apply_lora(model, self.lora)  # draws lora_A from the stage's seeded RNG, freezes the base
            if adapter_sd is not None:  # the previous stage's (or the resumed step's) adapters
                load_adapter_state(model, adapter_sd)
            full_sd = exact_trainable(model, full_sd, adapter_sd)
        else:
            apply_freeze(model, stage.trainable)
        weights_peak = peak_memory_gib(self.dist.device)
        opt, sched = build_optimizer(model, stage.lr, cfg.train.optimizer.betas, cfg.train.optimizer.eps, cfg.train.optimizer.weight_decay, stage.warmup_steps,
                                    stage.steps, stage.decay, stage.min_lr_ratio, check_finite=self.zero_stage == 0)
        self.engine = dse.build_engine(model, opt, sched, ds_cfg, self.mpu)
        if full_sd is not None and self.dtype != torch.float32:
            set_master_weights(self.engine.module, full_sd)
        del full_sd  # views of the checkpoint's memory map: unmapped here
        self._note_startup_memory(baseline, weights_peak)
        loader_state = None
        self.stage_step = 0
        if ckpt_state is not None:
            meta, path = ckpt_state
            self.stage_step = meta.stage_step
            self.bad_in_row = meta.bad_steps_in_row
            if same_topology:
                self.ckpt.load(self.engine, path)
                rng = self.ckpt.rng_state(path, self.dist.rank)
                if rng is not None:
                    restore_rng(rng)
            else:
                # Another world size / dp size / TP degree / ZeRO stage: DeepSpeed's universal
                # checkpoint (converted once, by rank 0) restores the trained weights, fp32
                # masters, Adam's moments and step, and the lr schedule's position. Frozen
                # weights are those the model was built with. The RNG states stay seeded (they
                # belong to the old ranks; training draws none).
                if self.dist.is_main:
                    log.info("topology changed since the checkpoint (world %d->%d, dp %d->%d, tp %d->%d, zero %d->%d): resuming "
                             "weights, optimizer and lr schedule through DeepSpeed's universal checkpoint",
                             meta.world_size, self.dist.world_size, meta.dp_size, self.dp_size, meta.tp, self.tp, meta.zero_stage,
                             self.zero_stage)
                universal.load(self.engine, universal.prepare(path, self.dist.rank), strict=self.lora is None)
            if not same_topology or meta.stage_steps != stage.steps:
                # The next update's lr from the schedule at its restored position (a stage made
                # longer or shorter changes it; another topology's loader may not restore it).
                self._sync_lr()
            if meta.dp_size == self.dp_size:
                loader_state = self.ckpt.loader_state(path, self.dp_rank)
            else:
                # data.sharding=global (checked in _resume_point): rank 0's position, dealt anew.
                loader_state = universal.loader_state_for(self.ckpt.loader_state(path, 0), self.dp_rank, self.dp_size)
        self.loader = self._build_loader(stage, loader_state, ckpt_state[1] if ckpt_state is not None else None)
        self.ema = self._build_ema(ckpt_state[1] if ckpt_state is not None else weights_dir.parent if weights_dir is not None else None)
        self._call("on_stage_start", stage)
        try:
            state = self._loop(stage)
        finally:
            self.loader.close()
        if state == "completed":
            self.last_checkpoint = self._save(stage, protect=True)
            if cfg.checkpoint.export_hf:
                self._export_hf(stage)
            self._call("on_stage_end", stage)
        self.engine.destroy()  # drops ZeRO-3 hooks before the next stage builds a new engine
        self.engine = None
        self.ema = None
        return state

    def _stage_start_weights(self, stage: StageSettings, root: Path) -> Path | None:
        """The whole weights `stage` started from: the newest earlier stage's end checkpoint under
        `root` (the resumed checkpoint's checkpoints/), else model.init_from (None: the seeded
        random init)."""
        ended = [p for m, p in complete_checkpoints(root) if m.stage < stage.index and m.stage_step >= m.stage_steps]
        return ended[-1] / "model" if ended else self._init_dir()

    def _note_startup_memory(self, baseline: float, weights_peak: float) -> None:
        """Record (and log on rank 0) the stage's start-up peaks, max over ranks."""
        b, w, e = all_reduce_max([baseline, weights_peak, peak_memory_gib(self.dist.device)], self.dist.device)
        self.startup_memory = {"baseline_gib": round(b, 3), "weights_gib": round(w, 3), "engine_gib": round(e, 3)}
        if self.dist.is_main:
            log.info("start-up memory per rank (max over ranks): %.2f GiB before the model, peak %.2f GiB with the weights loaded, "
                     "%.2f GiB with the engine built", b, w, e)
        self.write_status("running")

    def _build_ema(self, ckpt: Path | None):
        """The stage's weight average: continued from the checkpoint's (or the previous stage's)
        model_ema/ when it has one, else started from the weights the stage starts from."""
        decay = self.cfg.train.ema_decay
        if not decay:
            return None
        from janus_train.training.ema import WeightEMA

        ema = WeightEMA(self.engine.module, decay, self.zero_stage, self.dp_group)
        src = ckpt / EMA_DIR if ckpt is not None else None
        shard = read_ema_shard(ckpt, self.dist.rank) if ckpt is not None and sharded_source(src) is not None else None
        if shard is not None and shard["dp"] == self.dp_size:
            try:  # this rank's own slice: exact, nothing gathered
                ema.load_state_dict(shard)
                shard_loaded = True
            except ValueError:
                shard_loaded = False
            if shard_loaded:
                if self.dist.is_main:
                    log.info("weight average (decay %g) continues from %s", decay, src)
                return ema
        if src is not None and (src / "config.json").is_file():
            _, sd = read_checkpoint(src, "native")
            ema.load_whole(sd)
            if self.dist.is_main:
                log.info("weight average (decay %g) continues from %s", decay, src)
        return ema

    def inference_weights(self):
        """Context in which the module holds the weights to sample and evaluate with: the
        average when train.ema_decay > 0 (collective: every rank enters it), else as trained."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def _sync_lr(self) -> None:
        """Set the lr of the next update from the schedule at its restored position."""
        sched = self.engine.lr_scheduler
        for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)

    def _loop(self, stage: StageSettings) -> str:
        cfg = self.cfg
        # Every rank must produce gradients for the same parameters in every micro-step: ZeRO-3
        # gathers per module, and ZeRO-2 reduces gradient buckets per micro-step. Rows mixed
        # across ranks (data.granularity=row) or ZeRO-3 therefore run every branch.
        touch_all = self.zero_stage == 3 or cfg.data.granularity == "row"
        it = iter(self.loader)

        def flags() -> list[float]:
            # Summed over all ranks inside train_step and fetched with the step's other scalars
            # (its one device-to-host copy): has any rank been asked to stop? skipped samples so far?
            skipped_local = sum(sum(v.values()) for v in self.loader.stats().get("skipped", {}).values())
            return [float(self.stop.signum is not None), float(skipped_local)]

        while self.stage_step < stage.steps:
            t0 = time.perf_counter()
            lr = float(self.engine.get_lr()[0])
            micro_batches = next(it)
            slow = fault("step_sleep")
            if slow:
                time.sleep(slow[0])
            res = train_step(self.engine, micro_batches, self.dp_size, self.dp_group, self.dist.device, self.dtype, touch_all,
                             groups=self.loss_groups, flags=flags)
            # No torch.cuda.synchronize(): train_step's closing fetch has waited for the device.
            dt = time.perf_counter() - t0
            self.stage_step += 1
            self.global_step += 1
            if res.applied:
                self.bad_in_row = 0
                if self.ema is not None:
                    self.ema.update()
            else:
                self.bad_in_row += 1
                self.skipped_steps += 1
            stop_requested, skipped_samples = res.flags[0] > 0, int(res.flags[1])
            record = self._record(stage, res, lr, dt, skipped_samples)
            if self.evaluation is not None and self.evaluation.due(self.global_step, self.stage_step, stage):
                with self.inference_weights():
                    record.eval, record.eval_time_s = self.evaluation.run(self, self.global_step)
            if self.global_step % cfg.logging.every_steps == 0 or self.stage_step == stage.steps or record.eval is not None:
                self._call("on_step_end", stage, record)
                self.write_status("running")
            if self.bad_in_row >= cfg.train.max_bad_steps:
                raise TrainingAborted(
                    f"{self.bad_in_row} consecutive steps had a non-finite loss or gradient (last loss {res.loss}, step "
                    f"{self.global_step}); the update was skipped each time. Lower the learning rate "
                    f"(train.stages.{stage.name}.lr={stage.lr}) or inspect the data; raise train.max_bad_steps to tolerate more."
                )
            if stop_requested:
                self._save(stage)
                self.write_status("preempted", "stopped by signal after saving")
                return "preempted"
            if self.stage_step < stage.steps and self.global_step % cfg.checkpoint.every_steps == 0:
                self._save(stage)
        return "completed"

    def trainable_components(self, stage: StageSettings) -> list[str]:
        """The components that get weight gradients: the stage's, or (LoRA) those holding
        adapters and the modules to save."""
        if self.lora is None:
            return stage.trainable
        if getattr(self, "_lora_components", None) is None:
            from janus_train.models.lora import matched_modules

            with torch.device("meta"):
                skeleton = self.family.build(self.model_config)
            tops = {n.split(".")[0] for t in self.lora.target_modules for n in matched_modules(skeleton, t)}
            self._lora_components = [c for c in self.family.components if c in tops or c in self.lora.modules_to_save]
        return self._lora_components

    def _record(self, stage: StageSettings, res, lr: float, dt: float, skipped_samples: int) -> StepRecord:
        flops = step_flops(self.model_config, self.sizes, self.trainable_components(stage), res.counts)
        flops_per_s = flops / dt if dt > 0 else None
        mfu = flops_per_s / (self.dist.world_size * self.peak) if (self.peak and flops_per_s) else None
        mem = peak_memory_gib(self.dist.device)
        return StepRecord(
            step=self.global_step,
            stage=stage.index,
            stage_step=self.stage_step,
            lr=lr,
            loss=res.loss,
            loss_und=res.task_loss["und"],
            loss_text=res.task_loss["text"],
            loss_gen=res.task_loss.get("gen"),
            tokens_und=res.task_tokens["und"],
            tokens_text=res.task_tokens["text"],
            tokens_gen=res.task_tokens["gen"] if "gen" in res.task_tokens else int(res.counts["gen_inputs"]),
            loss_flow=res.task_loss.get("flow"),
            loss_repa=res.task_loss.get("repa"),
            grad_norm=res.grad_norm,
            tokens_per_s=res.tokens / dt,
            samples_per_s=res.samples / dt,
            step_time_s=dt,
            model_flops_per_s=flops_per_s,
            mfu=mfu,
            memory_gib=mem,
            skipped_samples=skipped_samples,
            skipped_steps=self.skipped_steps,
            bad_steps_in_row=self.bad_in_row,
            time=time.time(),
        )

    # ---- checkpoints and exports ------------------------------------------------------------
    def _save(self, stage: StageSettings, protect: bool = False) -> Path:
        meta = CheckpointMeta(
            step=self.global_step,
            stage=stage.index,
            stage_step=self.stage_step,
            stage_steps=stage.steps,
            world_size=self.dist.world_size,
            dp_size=self.dp_size,
            tp=self.tp,
            zero_stage=self.zero_stage,
            bad_steps_in_row=self.bad_in_row,
            skipped_steps=self.skipped_steps,
            stage_start=self.stage_start,
        )
        loader_state = self.loader.state_dict() if self.loader is not None else None
        # Only a stage end gathers whole weights (its hand-over and export need them); periodic
        # and signal saves write what each rank holds (checkpoint/sharded.py).
        whole = protect
        ema_sd = self.ema.full_state_dict() if self.ema is not None and whole else None  # collective; rank 0 holds it
        ema_shard = self.ema.state_dict() if self.ema is not None and not whole else None
        t0 = time.perf_counter()
        path = self.ckpt.save(self.engine, meta, loader_state, self.model_config, self.tokenizer_dir, protect=protect, lora=self._lora_save(),
                              ema_sd=ema_sd, whole=whole, ema_shard=ema_shard)
        seconds = time.perf_counter() - t0
        if self.dist.is_main:
            written = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            log.info("checkpoint %s saved in %.2f s, %.3f GiB written (%s)", path.name, seconds, written / 2**30,
                     "whole weights gathered" if whole else "sharded state only")
        self.last_checkpoint = path
        return path

    def _lora_save(self) -> LoraSave | None:
        if self.lora is None:
            return None
        path, fmt = self.lora_base
        return LoraSave(self.lora, path, fmt, type(self.engine.module))

    def _export_hf(self, stage: StageSettings) -> None:
        if self.dist.is_main:
            # transformers has no JanusFlow: its export is DeepSeek's release layout.
            fmt = "deepseek" if self.family.gen_kind == "flow" else "hf"
            out = self.run_dir / "exports" / f"stage{stage.index}"
            # A LoRA run's: merged whole weights (peft's merge of base + adapters), usable without peft.
            out = export_checkpoint(self.last_checkpoint, out, fmt)
            log.info("stage %d exported in %s format to %s", stage.index, fmt, out)
        barrier()


def _print_config_error(e: ConfigError, rank: int) -> None:
    if rank == 0:
        print(f"config error: {e}", file=sys.stderr, flush=True)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int) -> None:
    """janus_train's messages on stderr: info and up on rank 0 (resuming, exports), warnings and
    up on the other ranks. Its own handler, so what other libraries do to the root logger (or
    whether they configured it first) changes nothing."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def run(cfg: DictConfig, prepare: Callable[[DictConfig, DistInfo], None] | None = None) -> int:
    """Validate, set up the process group, train; returns the process exit code.

    `prepare(cfg, dist_info)`, if given, runs on every rank once the process group exists and
    before the config is checked against the file system (the demo builds its inputs there).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:
        run_cfg = validate_config(cfg, check_paths=prepare is None)
        tp = run_cfg.parallel.tp
        if world % tp:
            raise ConfigError("parallel.tp", f"{tp} must divide the world size {world}")
        run_cfg = validate_config(cfg, dp_size=world // tp, check_paths=prepare is None)
    except ConfigError as e:
        _print_config_error(e, rank)
        return EXIT_CONFIG
    set_cpu_threads(run_cfg.parallel.cpu_threads)
    dist_info = init_distributed(run_cfg.parallel.timeout_minutes)
    trainer = None
    try:
        if prepare is not None:
            prepare(cfg, dist_info)
            run_cfg = validate_config(cfg, dp_size=world // tp, check_paths=True)
        mpu = None
        if tp > 1:
            from janus_train.parallel.tensor_parallel import init_tensor_parallel

            mpu = init_tensor_parallel(tp, run_cfg.parallel.timeout_minutes)
        if dist_info.is_main:
            Path(run_cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_cfg.run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        trainer = Trainer(run_cfg, dist_info, mpu)
        state = trainer.run()
        if state == "completed":
            trainer.write_status("completed")
        trainer._call("on_run_end", state)
        code = EXIT_OK
    except ConfigError as e:
        _print_config_error(e, dist_info.rank)
        code = EXIT_CONFIG
    except TrainingAborted as e:
        print(f"training aborted: {e}", file=sys.stderr, flush=True)
        if trainer is not None:
            trainer.write_status("failed", str(e))
        code = EXIT_ABORTED
    except Exception as e:  # noqa: BLE001 - report, mark the run failed, exit non-zero
        traceback.print_exc()
        print(f"rank {dist_info.rank}: training failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if trainer is not None:
            trainer.write_status("failed", f"{type(e).__name__}: {e}")
        code = EXIT_FAILED
    if code == EXIT_OK:
        destroy()
    elif dist.is_initialized():
        # A failed peer may never reach a barrier: leave without one.
        dist.destroy_process_group()
    return code
