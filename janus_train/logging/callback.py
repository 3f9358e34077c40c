"""The hooks the trainer calls (metrics file, W&B, progress bar, sample grids, evaluation
plug in here); `trainer` is the training.trainer.Trainer."""

from __future__ import annotations



class Callback:
    """Override what you need. `record` is the `StepRecord` of one logged step."""

    def on_run_start(self, trainer) -> None: ...

    def on_stage_start(self, trainer, stage) -> None: ...

    def on_step_end(self, trainer, stage, record) -> None: ...

    def on_stage_end(self, trainer, stage) -> None: ...

    def on_run_end(self, trainer, state: str) -> None: ...
