"""Weights & Biases: offline by default (the WANDB_MODE environment variable wins); the run
directory is `<run_dir>/wandb`, so `wandb sync <run_dir>/wandb/offline-run-*` uploads later.

One W&B run per run_dir (a stable id in `wandb/run_id`, `resume="allow"`): a resumed job
continues the same run. W&B's history only grows with the step (its SDK drops a step lower than
the run's last one when online, and offline runs are synced as they were written), and rewinding
it is a server-side preview feature, so the steps a crashed job logged after its last checkpoint
cannot be taken back. The logger therefore never sends a step it already sent (`wandb/last_step`):
after a resume W&B shows each step once, with the values of its first run for the steps between
the checkpoint and the crash (bit for bit the rerun's when the topology is unchanged), while
metrics.jsonl is cut back to the checkpoint and holds the rerun's values.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from janus_train.logging.callback import Callback

log = logging.getLogger("janus_train")


class WandbLogger(Callback):
    def __init__(self, run_dir: str | Path, project: str, mode: str, entity: str | None, name: str | None, config: dict,
                 resume_step: int = 0):
        import wandb

        self.wandb = wandb
        run_dir = Path(run_dir)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", mode)
        # A stable id per run directory: a resumed run continues the same W&B run.
        id_file = run_dir / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.step_file = run_dir / "wandb" / "last_step"
        # The last step sent to this W&B run: by earlier jobs (`held`, not sent again) and so far.
        self.held = int(self.step_file.read_text()) if self.step_file.is_file() else 0
        self.sent = self.held
        if self.held > resume_step:
            log.info("W&B already has steps %d-%d from before this restart (from step %d): they are not logged again",
                     resume_step + 1, self.held, resume_step)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name or run_dir.name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def _new(self, step: int) -> bool:
        """Whether `step` is past what earlier jobs sent to this W&B run."""
        return step > self.held

    def _sent(self, step: int) -> None:
        if step > self.sent:
            self.sent = step
            tmp = self.step_file.with_name(".last_step.tmp")
            tmp.write_text(str(step))
            os.replace(tmp, self.step_file)

    def on_step_end(self, trainer, stage, record) -> None:
        if not self._new(record.step):
            return
        data = {(k if k.startswith("eval/") else f"train/{k}"): v for k, v in record.numbers().items() if k != "step"}
        self.run.log(data, step=record.step)
        self._sent(record.step)

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        if self._new(step):
            self.run.log({k: self.wandb.Image(v) for k, v in images.items()}, step=step)
            self._sent(step)

    def log_eval(self, step: int, values: dict[str, float], images: dict[str, Any]) -> None:
        """An evaluation's numbers and pictures, at the step it evaluated (logged before that
        step's training metrics, which W&B merges into the same step)."""
        if self._new(step):
            self.run.log({**values, **{k: self.wandb.Image(v) for k, v in images.items()}}, step=step, commit=False)

    def on_run_end(self, trainer, state: str) -> None:
        self.run.summary["final_state"] = state
        self.run.finish()
