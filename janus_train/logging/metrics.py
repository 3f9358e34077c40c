"""The metrics of one logged step (`StepRecord`, the one schema), and `<run_dir>/metrics.jsonl`:
one JSON object per logged step (rank 0 writes). On resume the file is first cut back to the
resumed checkpoint's step, so the steps run again after a crash appear once."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from janus_train.logging.callback import Callback


@dataclass
class StepRecord:
    """Every metric of a logged step (None where a value does not apply), in file order."""

    step: int  # global optimizer steps completed
    stage: int
    stage_step: int
    lr: float
    loss: float  # Janus-Pro: token-mean CE over every supervised token; JanusFlow: CE mean + flow mean + REPA mean
    loss_und: float | None  # each task's own token mean (None: no tokens of it this step)
    loss_text: float | None
    loss_gen: float | None  # Janus-Pro's gen CE (None for JanusFlow)
    tokens_und: int  # supervised tokens per task (all ranks)
    tokens_text: int
    tokens_gen: int  # Janus-Pro: supervised codes; JanusFlow: latent tokens
    grad_norm: float | None
    tokens_per_s: float
    samples_per_s: float
    step_time_s: float
    model_flops_per_s: float | None
    mfu: float | None
    memory_gib: float  # peak device memory (GPU) or peak RSS (CPU)
    skipped_samples: int
    skipped_steps: int
    bad_steps_in_row: int
    time: float
    loss_flow: float | None = None  # JanusFlow: mean squared velocity error per latent element
    loss_repa: float | None = None  # JanusFlow: mean 1 - cos(projected LLM features, SigLIP features) per latent token
    eval_time_s: float | None = None  # seconds spent evaluating after this step (not in step_time_s)
    eval: dict[str, float] | None = None  # evaluation summary, written as eval/<name> keys

    def numbers(self) -> dict[str, float]:
        """The numeric fields (for dashboards), evaluation results as eval/<name>."""
        out = {k: v for k, v in asdict(self).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out.update({f"eval/{k}": v for k, v in (self.eval or {}).items()})
        return out

    def row(self) -> dict[str, Any]:
        """The metrics.jsonl line: every field, evaluation results flattened to eval/<name>."""
        out = {k: clean(v) for k, v in asdict(self).items() if k != "eval"}
        out.update({f"eval/{k}": clean(v) for k, v in (self.eval or {}).items()})
        return out


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StepRecord) if f.name != "eval")


def clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so a diverged run stays readable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsFile(Callback):
    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        """`resume_step`: the step the run continues from; later lines are dropped first."""
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)

    def on_step_end(self, trainer, stage, record: StepRecord) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record.row()) + "\n")
            f.flush()


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the lines of `path` up to `step` (and drop a torn last line); atomic (temp file and
    rename). Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and row.get("step", step + 1) <= step
        except ValueError:
            keep = False
        if keep:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped
