"""Weights & Biases: offline by default (the WANDB_MODE environment variable wins); the run
directory is `<run_dir>/wandb`, so `wandb sync <run_dir>/wandb/offline-run-*` uploads later."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from janus_train.logging.callback import Callback


class WandbLogger(Callback):
    def __init__(self, run_dir: str | Path, project: str, mode: str, entity: str | None, name: str | None, config: dict):
        import wandb

        self.wandb = wandb
        run_dir = Path(run_dir)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", mode)
        # A stable id per run directory: a resumed run continues the same W&B run.
        id_file = run_dir / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
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

    def on_step_end(self, trainer, stage, record) -> None:
        data = {(k if k.startswith("eval/") else f"train/{k}"): v for k, v in record.numbers().items() if k != "step"}
        self.run.log(data, step=record.step)

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        self.run.log({k: self.wandb.Image(v) for k, v in images.items()}, step=step)

    def log_eval(self, step: int, values: dict[str, float], images: dict[str, Any]) -> None:
        """An evaluation's numbers and pictures, at the step it evaluated (logged before that
        step's training metrics, which W&B merges into the same step)."""
        self.run.log({**values, **{k: self.wandb.Image(v) for k, v in images.items()}}, step=step, commit=False)

    def on_run_end(self, trainer, state: str) -> None:
        self.run.summary["final_state"] = state
        self.run.finish()
