"""One optimizer step: forward/backward over this rank's micro-batches, then the update.

The loss is normalised by the *global* number of supervised tokens of the step (all ranks,
all micro-steps), so a run's trajectory does not depend on how the global batch is split
into ranks and micro-batches. DeepSpeed averages gradients over the data-parallel group and
would divide by the accumulation steps; we undo both scalings explicitly:

    loss_backward(micro j, rank r) = dp_size * sum_CE(j, r) / N_global
    => after DeepSpeed's mean over ranks: grad = d/dθ [ sum over all tokens CE / N_global ]

With task weights (train.loss_weights), sum_CE is sum over tasks of weight x that task's summed
CE; the reported losses stay unweighted token means.

JanusFlow's losses have different units, so each has its own global normaliser (a "loss
group", models/families.py): CE over und+text tokens, the flow loss over latent elements, REPA
over latent tokens; the objective is the sum of the groups' means, each formed as above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from janus_train.contracts.batch import PackedBatch
from janus_train.models.families import JANUS, LossGroup
from janus_train.parallel.distributed import all_reduce_sum


@dataclass
class StepResult:
    loss: float  # sum over loss groups of the group's summed loss / its global count (unweighted)
    task_loss: dict[str, float | None]  # per-loss mean (None when nothing of it in the step)
    task_tokens: dict[str, int]  # global count per loss (tokens; latent elements for flow)
    tokens: int  # global non-pad tokens processed
    samples: int  # global documents processed
    applied: bool  # False when the update was skipped (non-finite loss or gradients)
    grad_norm: float | None
    counts: dict[str, float] = field(default_factory=dict)  # global inputs for the FLOP model
    flags: list[float] = field(default_factory=list)  # train_step's `flags`, summed over all ranks


def batch_counts(mb: PackedBatch) -> torch.Tensor:
    """[useful tokens, Σ len² of useful docs, text-sup, gen-sup, images, gen inputs, docs] of one
    micro-batch, from its host counts (`PackedBatch.host_counts()`: nothing read from a device)."""
    c = mb.host_counts()
    return torch.tensor(
        [
            float(c["useful_tokens"]),
            float(c["useful_len_sq"]),
            float(c["und"] + c["text"]),
            float(c["gen"]),
            float(c["images"]),
            float(c["gen_inputs"]),
            float(c["useful_docs"]),
        ],
        dtype=torch.float64,
    )


COUNT_NAMES = ("tokens", "doc_len_sq", "text_sup", "gen_sup", "images", "gen_inputs", "docs")


def _scaled(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor for a 0-dim float64 `factor` on any device, bitwise `x * float(factor)`: torch
    applies a Python float at x's compute precision (float32 for fp32/bf16/fp16 tensors, float64
    for fp64), rounding the product to x's dtype; the gradient is rounded the same way."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x * factor.to(device=x.device, dtype=compute)).to(x.dtype)


def _closing_parts(glob: torch.Tensor, sums: torch.Tensor, flags, comm_dev: torch.device, dp_group) -> tuple[list[torch.Tensor], int]:
    """The step's scalars for its one fetch: global counts, loss sums (summed over the ranks),
    and the summed `flags()`; and how many flags there are."""
    parts = [glob, all_reduce_sum(sums.to(comm_dev), group=dp_group)]
    if flags is None:
        return parts, 0
    values = [float(v) for v in flags()]
    parts.append(all_reduce_sum(torch.tensor(values, dtype=torch.float64).to(comm_dev, non_blocking=True)))
    return parts, len(values)


def train_step(
    engine,
    micro_batches: list[PackedBatch],
    dp_size: int,
    dp_group,
    device: torch.device,
    float_dtype: torch.dtype,
    touch_all: bool,
    loss_weights: dict[str, float] | None = None,
    groups: list[LossGroup] | None = None,
    flags: Callable[[], list[float]] | None = None,
) -> StepResult:
    """`groups`: how the model family's losses are normalised (models/families.py); None is
    Janus-Pro's single CE group with `loss_weights`. `flags`: called once the update is done;
    its numbers are summed over all ranks (the default group) and returned in
    `StepResult.flags` (the trainer's stop request and skipped-sample count).

    One device-to-host copy per step: the counts come from the batches' host metadata
    (`PackedBatch.host_counts()`), the normalisers stay tensors on the communication device
    (a CPU tensor under gloo, the GPU under NCCL), the loss sums accumulate on the device, and
    the step's scalars (global counts, loss sums, flags, grad norm) come back in one copy at the
    end (under ZeRO-0 just before the update, with the gradients' finiteness, which our
    optimizer guard must decide on as a Python bool)."""
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise RuntimeError(
            f"the loader gave {len(micro_batches)} micro-batches but DeepSpeed expects "
            f"{engine.gradient_accumulation_steps()} accumulation steps"
        )
    if groups is None:
        groups = JANUS.loss_groups(loss_weights or {}, None)
    names = [n for g in groups for n in g.names]
    index = {n: i for i, n in enumerate(names)}
    # Global counts of every loss's normaliser + the FLOP-model counts, in one all-reduce. The
    # integers are exact in float64, so the sums are those the old per-tensor count gave.
    local = torch.zeros(len(names) + len(COUNT_NAMES), dtype=torch.float64)
    for mb in micro_batches:
        c = mb.loss_counts()
        local[: len(names)] += torch.tensor([float(c.get(n, 0)) for n in names], dtype=torch.float64)
        local[len(names) :] += batch_counts(mb)
    comm_dev = device if device.type == "cuda" else torch.device("cpu")
    # non_blocking: a pageable host tensor is staged at once; a blocking copy would also wait
    # for the device's queue.
    glob = all_reduce_sum(local.to(comm_dev, non_blocking=True), group=dp_group)
    # dp_size / N_global of each group stays a tensor on the communication device: the counts
    # are exact integers in float64, so this is the double the Python division gave.
    factors = []
    for g in groups:
        n_global = sum(glob[index[n]] for n in g.names).clamp(min=1.0)
        factors.append(torch.full_like(n_global, float(dp_size)) / n_global)

    # ZeRO-0's optimizer guard (training/optim.py) must hand DeepSpeed its skip decision as a
    # Python bool at the update: the step's one fetch then happens just before the update,
    # carrying the gradients' finiteness too. Under ZeRO DeepSpeed decides itself, and the
    # fetch follows the update (with its grad norm).
    optimizer = getattr(engine, "optimizer", None)
    guard = optimizer if getattr(optimizer, "check_finite", False) else None
    sums = None
    host = None
    for j, mb in enumerate(micro_batches):
        batch = mb.to(device, float_dtype)
        out = engine(batch, touch_all=touch_all)
        total = None
        for g, factor in zip(groups, factors):
            if g.weights is None:  # a plain sum: the default objective is bitwise the unweighted one
                group_sum = sum(out.loss_sum[n] for n in g.names)
            else:
                group_sum = sum(g.weights.get(n, 1.0) * out.loss_sum[n] for n in g.names)
            term = _scaled(group_sum, factor)
            total = term if total is None else total + term
        engine.backward(total, scale_wrt_gas=False)
        mb_sums = torch.stack([out.loss_sum[n].detach().double() for n in names])
        sums = mb_sums if sums is None else sums + mb_sums
        if guard is not None and j == len(micro_batches) - 1:
            parts, n_flags = _closing_parts(glob, sums, flags, comm_dev, dp_group)
            host = torch.cat([*parts, guard.nonfinite_grads().to(comm_dev)]).cpu().tolist()  # the one copy
            guard.known_nonfinite = host.pop() > 0
        engine.step()
    norm = engine.get_global_grad_norm()
    if host is None:
        parts, n_flags = _closing_parts(glob, sums, flags, comm_dev, dp_group)
        if isinstance(norm, torch.Tensor):
            parts.append(norm.detach().reshape(1).to(device=comm_dev, dtype=torch.float64))
        # The step's one device-to-host copy.
        host = torch.cat(parts).cpu().tolist()
    elif isinstance(norm, torch.Tensor):  # not kept by ZeRO-0 in fp32; a second copy if it ever is
        host.append(float(norm))
    glob_h, sums_h = host[: len(glob)], host[len(glob) : len(glob) + len(names)]
    flags_h = host[len(glob) + len(names) : len(glob) + len(names) + n_flags]
    if isinstance(norm, torch.Tensor):
        norm = host[-1]
    counts = {n: int(glob_h[i]) for i, n in enumerate(names)}
    n_globals = [max(1, sum(counts[n] for n in g.names)) for g in groups]
    per_name = dict(zip(names, sums_h))
    loss = sum(sum(per_name[n] for n in g.names) / n_global for g, n_global in zip(groups, n_globals))
    applied = bool(engine.was_step_applied()) and math.isfinite(loss)
    extra = glob_h[len(names) :]
    return StepResult(
        loss=loss,
        task_loss={n: (per_name[n] / counts[n] if counts[n] else None) for n in names},
        task_tokens=counts,
        tokens=int(extra[0]),
        samples=int(extra[COUNT_NAMES.index("docs")]),
        applied=applied,
        grad_norm=float(norm) if norm is not None else None,
        counts=dict(zip(COUNT_NAMES, extra)),
        flags=flags_h,
    )
