"""Evaluation during training: the `eval:` config section run at its steps on the live model.

Every `eval.every_steps` global steps and after the last step of every stage (with
`eval.at_stage_end`), all ranks run the evaluation harness (eval/harness.py) together on the
engine's module. With whole weights on every rank (ZeRO-0/1/2, no TP) the data-parallel ranks
split the items and gather the results; under ZeRO-3 or tensor parallelism every rank evaluates
every item, so no rank skips a gather or a TP collective. The step's metrics get the summary
(`eval/<name>`) and the time it took (`eval_time_s`, not counted in tokens/s or MFU); rank 0
writes the report and the sample grid to run_dir/eval/step_XXXXXXXX/.

JanusFlow's gen samples are decoded with the run's VAE (`model.vae`), loaded on the first
evaluation that draws and kept; it is not part of the engine, so ZeRO-3 needs no gather for it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from janus_train.eval.harness import EvalContext, Evaluator, summary
from janus_train.models.janusflow.config import JanusFlowConfig
from janus_train.training.config import EvalSection, StageSettings


class TrainingEvaluation:
    def __init__(self, cfg: EvalSection, run_dir: Path, tokenizer: Any, wandb_logger: Any = None, vae_path: str | None = None):
        self.cfg = cfg
        self.dir = Path(run_dir) / "eval"
        self.tokenizer = tokenizer
        self.wandb = wandb_logger
        self.vae_path = vae_path  # JanusFlow: the VAE that decodes its gen samples
        self._vae = None  # loaded by the first evaluation that needs it

    def due(self, global_step: int, stage_step: int, stage: StageSettings) -> bool:
        if self.cfg.data is None:
            return False
        periodic = self.cfg.every_steps > 0 and global_step % self.cfg.every_steps == 0
        return periodic or (self.cfg.at_stage_end and stage_step == stage.steps)

    def run(self, trainer, step: int) -> tuple[dict[str, float], float]:
        """Collective: every rank calls it. Returns (summary, seconds)."""
        t0 = time.monotonic()
        shard = trainer.zero_stage < 3 and trainer.tp == 1
        ctx = EvalContext(
            rank=trainer.dp_rank if shard else trainer.dist.rank,
            world=trainer.dp_size if shard else trainer.dist.world_size,
            shard=shard,
            group=trainer.dp_group,
            device=trainer.dist.device,
            dtype=trainer.dtype,
            zero3=trainer.zero_stage == 3,
        )
        model = trainer.engine.module
        vae = None
        if isinstance(model.config, JanusFlowConfig) and self.vae_path is not None:
            vae = self._vae if self._vae is not None else self.vae_path
        evaluator = Evaluator(model, self.tokenizer, self.cfg.data, self.cfg, ctx, vae=vae)
        out_dir = self.dir / f"step_{step:08d}"
        report = evaluator.run(out_dir if trainer.dist.is_main else None)
        if vae is not None and not isinstance(evaluator.vae, (str, Path)):
            self._vae = evaluator.vae  # loaded (or given): keep it for the next evaluation
        result = summary(report)
        if self.wandb is not None and trainer.dist.is_main:
            images = {"eval/gen_grid": evaluator.grid} if evaluator.grid is not None else {}
            self.wandb.log_eval(step, {f"eval/{k}": v for k, v in result.items()}, images)
        return result, time.monotonic() - t0
