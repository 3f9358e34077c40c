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


def batch_counts(mb: PackedBatch) -> torch.Tensor:
    """[useful tokens, Σ len² of useful docs, text-sup, gen-sup, images, gen inputs, docs] of one micro-batch."""
    doc = mb.doc_ids().reshape(-1)
    supervised = mb.loss_task.reshape(-1) >= 0
    n_docs = int(mb.cu_seqlens.numel() - 1)
    useful_doc = torch.zeros(n_docs, dtype=torch.bool)
    useful_doc[doc[supervised].cpu()] = True
    lengths = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).to(torch.float64).cpu()
    task = mb.loss_task
    return torch.tensor(
        [
            float(lengths[useful_doc].sum()),
            float((lengths[useful_doc] ** 2).sum()),
            float(((task == 0) | (task == 1)).sum()),
            float((task == 2).sum()),
            float(0 if mb.und_pixel_values is None else mb.und_pixel_values.shape[0]),
            float(mb.gen_input_mask.sum()),
            float(useful_doc.sum()),
        ],
        dtype=torch.float64,
    )


COUNT_NAMES = ("tokens", "doc_len_sq", "text_sup", "gen_sup", "images", "gen_inputs", "docs")


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
) -> StepResult:
    """`groups`: how the model family's losses are normalised (models/families.py); None is
    Janus-Pro's single CE group with `loss_weights`."""
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise RuntimeError(
            f"the loader gave {len(micro_batches)} micro-batches but DeepSpeed expects "
            f"{engine.gradient_accumulation_steps()} accumulation steps"
        )
    if groups is None:
        groups = JANUS.loss_groups(loss_weights or {}, None)
    names = [n for g in groups for n in g.names]
    # Global counts of every loss's normaliser + the FLOP-model counts, in one all-reduce.
    local = torch.zeros(len(names) + len(COUNT_NAMES), dtype=torch.float64)
    for mb in micro_batches:
        c = mb.loss_counts()
        local[: len(names)] += torch.tensor([float(c.get(n, 0)) for n in names], dtype=torch.float64)
        local[len(names) :] += batch_counts(mb)
    comm_dev = device if device.type == "cuda" else torch.device("cpu")
    glob = all_reduce_sum(local.to(comm_dev), group=dp_group).cpu()
    counts = {n: int(glob[i]) for i, n in enumerate(names)}
    norms = [max(1, sum(counts[n] for n in g.names)) for g in groups]

    sums = torch.zeros(len(names), dtype=torch.float64)
    for mb in micro_batches:
        batch = mb.to(device, float_dtype)
        out = engine(batch, touch_all=touch_all)
        total = None
        for g, n_global in zip(groups, norms):
            if g.weights is None:  # a plain sum: the default objective is bitwise the unweighted one
                group_sum = sum(out.loss_sum[n] for n in g.names)
            else:
                group_sum = sum(g.weights.get(n, 1.0) * out.loss_sum[n] for n in g.names)
            term = group_sum * (dp_size / n_global)
            total = term if total is None else total + term
        engine.backward(total, scale_wrt_gas=False)
        engine.step()
        sums += torch.stack([out.loss_sum[n].detach().double().cpu() for n in names])
    sums = all_reduce_sum(sums.to(comm_dev), group=dp_group).cpu()
    per_name = {n: float(sums[i]) for i, n in enumerate(names)}
    loss = sum(sum(per_name[n] for n in g.names) / n_global for g, n_global in zip(groups, norms))
    applied = bool(engine.was_step_applied()) and math.isfinite(loss)
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else None
    return StepResult(
        loss=loss,
        task_loss={n: (per_name[n] / counts[n] if counts[n] else None) for n in names},
        task_tokens=counts,
        tokens=int(glob[len(names)]),
        samples=int(glob[len(names) + COUNT_NAMES.index("docs")]),
        applied=applied,
        grad_norm=norm,
        counts={n: float(glob[len(names) + i]) for i, n in enumerate(COUNT_NAMES)},
    )
