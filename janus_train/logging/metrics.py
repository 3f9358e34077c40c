"""`<run_dir>/metrics.jsonl`: one JSON object per logged step (rank 0 writes, appends on resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from janus_train.training.callbacks import Callback

# Every record has these keys (null where a value does not apply), in this order.
FIELDS = (
    "step", "stage", "stage_step", "lr", "loss", "loss_und", "loss_text", "loss_gen",
    "tokens_und", "tokens_text", "tokens_gen", "grad_norm", "tokens_per_s", "samples_per_s",
    "step_time_s", "model_flops_per_s", "mfu", "memory_gib", "skipped_samples", "skipped_steps",
    "bad_steps_in_row", "time",
)


def clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so a diverged run stays readable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsFile(Callback):
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def on_step_end(self, trainer, stage, record: dict[str, Any]) -> None:
        row = {k: clean(record.get(k)) for k in FIELDS}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
