"""Hooks the trainer calls; metrics files, W&B, progress bars and samples plug in here."""

from __future__ import annotations

from typing import Any


class Callback:
    """Override what you need. `record` is the metrics dict of one logged step."""

    def on_run_start(self, trainer) -> None: ...

    def on_stage_start(self, trainer, stage) -> None: ...

    def on_step_end(self, trainer, stage, record: dict[str, Any]) -> None: ...

    def on_stage_end(self, trainer, stage) -> None: ...

    def on_run_end(self, trainer, state: str) -> None: ...
