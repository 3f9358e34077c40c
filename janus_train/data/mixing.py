"""Exact task mixing: how many rows of each task a step holds, which rank and micro-step each
row goes to, and which source each document comes from.

Rows per step. A step is `global_batch` rows. The und:text:gen ratio is turned into row
counts by largest-remainder rounding: every task gets floor(share), and the rows left over
go to the largest fractional remainders; equal remainders are ordered by a permutation drawn
from (seed, step), so ties rotate between tasks over steps instead of always favouring one.

Ranks and micro-steps. Each of the D data-parallel ranks gets G/D rows per step as M
micro-batches of m rows (G = global_batch, m = micro_batch_rows, M = G/(D*m)); every rank runs
the same M micro-steps. With ZeRO-3/FSDP every rank must run the same modules in a micro-step
(an und micro-step gathers SigLIP, a gen micro-step the VQ embedding and gen head), so:

  granularity="micro_step" (default): the largest-remainder rounding apportions the M
    micro-steps (each D*m rows) instead of single rows. Micro-step j holds the same task on
    every rank, and every micro-batch is task-homogeneous. Row counts are D*m times the
    rounded micro-step counts; they equal the row-level rounding whenever D*m divides the
    row shares (always at D*m = 1). No ZeRO-3 hang is possible.
  granularity="row": rows are apportioned one by one (exact row-level largest remainder).
    Rows are laid out task by task (und, text, gen) in micro-step-major order: global row g
    goes to micro-step g // (D*m), rank (g % (D*m)) // m. At most two micro-steps per step
    (the task boundaries) then mix tasks across ranks or within a micro-batch; the engine
    must run every branch there (e.g. unused ones on dummy input scaled by 0).

No layout can have both: aligned task-homogeneous micro-steps make every task's row count a
multiple of D*m, and row-level rounding (e.g. 2:3:5 of 512 -> 102/154/256) is not.

Sources within a task. `SourceBlender` is the greedy max-error rule (Megatron's
build_blending_indices): the next document comes from the source whose count lags its weight
share the most. Counts never differ from weight * n by a full document, and with rational
weights a:b:... the choice sequence repeats every P = a+b+... documents with exact counts, so
the packer's per-step rounding to a multiple of P makes every step exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from janus_train.contracts.batch import TASKS

GRANULARITIES = ("micro_step", "row")


def step_rng(seed: int, step: int, purpose: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), purpose])


def largest_remainder(weights: Sequence[float], total: int, tie_order: Sequence[int] | None = None) -> list[int]:
    """Integer counts summing to `total`, proportional to `weights` (Hamilton's method).

    Remainders are compared exactly (as fractions); ties go to the index that comes first in
    `tie_order` (default: lower index first). Zero weights always get 0.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    fw = [Fraction(w) for w in weights]
    wsum = sum(fw)
    if wsum == 0:
        raise ValueError(f"at least one weight must be positive, got {list(weights)}")
    shares = [w * total / wsum for w in fw]
    counts = [math.floor(s) for s in shares]
    left = total - sum(counts)
    order = list(tie_order) if tie_order is not None else list(range(len(weights)))
    rank = {i: r for r, i in enumerate(order)}
    by_remainder = sorted(
        (i for i in range(len(weights)) if fw[i] > 0), key=lambda i: (-(shares[i] - counts[i]), rank[i])
    )
    for i in by_remainder[:left]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class StepPlan:
    """The task layout of one step (identical on every rank)."""

    rows: dict[str, int]  # global rows per task
    # micro_tasks[j][r] = task names of rank r's rows in micro-step j (m names each)
    micro_tasks: list[list[list[str]]]

    def rank_rows(self, rank: int) -> dict[str, int]:
        """Rows per task on one rank."""
        out = {t: 0 for t in TASKS}
        for per_rank in self.micro_tasks:
            for t in per_rank[rank]:
                out[t] += 1
        return out

    def micro_step_task(self, j: int) -> str:
        """The task of micro-step j on every rank, or "mixed"."""
        names = {t for per_rank in self.micro_tasks[j] for t in per_rank}
        return names.pop() if len(names) == 1 else "mixed"


def plan_step(
    ratio: Sequence[float],
    global_batch: int,
    dp_size: int,
    micro_batch_rows: int,
    seed: int,
    step: int,
    granularity: str = "micro_step",
) -> StepPlan:
    """Rows per task and the row -> (micro-step, rank) layout of step `step`."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}")
    unit = dp_size * micro_batch_rows
    if global_batch % unit:
        raise ValueError(
            f"global_batch={global_batch} must be divisible by dp_size*micro_batch_rows={dp_size}*{micro_batch_rows}"
        )
    n_micro = global_batch // unit
    tie_order = [int(i) for i in step_rng(seed, step).permutation(len(TASKS))]
    if granularity == "micro_step":
        slots = largest_remainder(ratio, n_micro, tie_order)
        rows = {t: n * unit for t, n in zip(TASKS, slots)}
        micro = [t for t, n in zip(TASKS, slots) for _ in range(n)]
        micro_tasks = [[[t] * micro_batch_rows for _ in range(dp_size)] for t in micro]
    else:
        counts = largest_remainder(ratio, global_batch, tie_order)
        rows = dict(zip(TASKS, counts))
        flat = [t for t, n in zip(TASKS, counts) for _ in range(n)]
        micro_tasks = [
            [flat[j * unit + r * micro_batch_rows : j * unit + (r + 1) * micro_batch_rows] for r in range(dp_size)]
            for j in range(n_micro)
        ]
    return StepPlan(rows=rows, micro_tasks=micro_tasks)


def blend_period(weights: Sequence[float], max_period: int = 64) -> list[int] | None:
    """Smallest integer weights a_i proportional to `weights` if their sum P (the period:
    P documents hold every source an integer number of times) is at most max_period."""
    fr = [Fraction(w).limit_denominator(1_000_000) for w in weights]
    if any(abs(float(f) - w) > 1e-9 * max(1.0, w) for f, w in zip(fr, weights)):
        return None
    den = math.lcm(*(f.denominator for f in fr))
    ints = [int(f * den) for f in fr]
    g = math.gcd(*ints)
    ints = [i // g for i in ints]
    return ints if sum(ints) <= max_period else None


class SourceBlender:
    """Greedy max-error choice of the source of each next document (deterministic).

    The next source is argmax_i (w_i * (n + 1) - c_i) over the normalised weights w_i and
    counts c_i of the n documents so far; ties go to the lower index. With small rational
    weights the comparison is done in integers, so ties (and the period) are exact however
    long the run.
    """

    def __init__(self, weights: Sequence[float], max_period: int = 64) -> None:
        if not weights or any(w <= 0 for w in weights):
            raise ValueError(f"source weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.counts = [0] * len(weights)
        self.int_weights = blend_period(weights, max_period) if len(weights) > 1 else None
        self.period = sum(self.int_weights) if self.int_weights else None

    def peek(self) -> int:
        if len(self.counts) == 1:
            return 0
        n = sum(self.counts) + 1
        best = 0
        if self.int_weights is not None:
            p = self.period
            errs = [a * n - p * c for a, c in zip(self.int_weights, self.counts)]
            for i in range(1, len(errs)):
                if errs[i] > errs[best]:
                    best = i
            return best
        best_err = -math.inf
        for i, (w, c) in enumerate(zip(self.weights, self.counts)):
            err = w * n - c
            if err > best_err:
                best, best_err = i, err
        return best

    def advance(self, i: int) -> None:
        self.counts[i] += 1

    def undo(self, i: int) -> None:
        if self.counts[i] <= 0:
            raise ValueError(f"cannot undo source {i}: no document taken from it")
        self.counts[i] -= 1

    def state_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if len(sd["counts"]) != len(self.counts):
            raise ValueError(f"blender state has {len(sd['counts'])} sources, this loader has {len(self.counts)}")
        self.counts = [int(c) for c in sd["counts"]]
