"""One optimizer step: forward/backward over this rank's micro-batches, then the update.

The loss is normalised by the *global* number of supervised tokens of the step (all ranks,
all micro-steps), so a run's trajectory does not depend on how the global batch is split
into ranks and micro-batches. DeepSpeed averages gradients over the data-parallel group and
would divide by the accumulation steps; we undo both scalings explicitly:

    loss_backward(micro j, rank r) = dp_size * sum_CE(j, r) / N_global
    => after DeepSpeed's mean over ranks: grad = d/dθ [ sum over all tokens CE / N_global ]

With task weights (train.loss_weights), sum_CE is sum over tasks of weight x that task's summed
CE; the reported losses stay unweighted token means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from janus_train.contracts.batch import TASKS, PackedBatch
from janus_train.parallel.distributed import all_reduce_sum


@dataclass
class StepResult:
    loss: float  # sum of CE over all supervised tokens / their count (global)
    task_loss: dict[str, float | None]  # per-task mean CE (None when the task had no tokens)
    task_tokens: dict[str, int]  # global supervised tokens per task
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
) -> StepResult:
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise RuntimeError(
            f"the loader gave {len(micro_batches)} micro-batches but DeepSpeed expects "
            f"{engine.gradient_accumulation_steps()} accumulation steps"
        )
    # Global supervised-token counts per task + the FLOP-model counts, in one all-reduce.
    local = torch.zeros(len(TASKS) + len(COUNT_NAMES), dtype=torch.float64)
    for mb in micro_batches:
        local[: len(TASKS)] += torch.tensor([float(v) for v in mb.supervised_tokens().values()], dtype=torch.float64)
        local[len(TASKS) :] += batch_counts(mb)
    comm_dev = device if device.type == "cuda" else torch.device("cpu")
    glob = all_reduce_sum(local.to(comm_dev), group=dp_group).cpu()
    task_tokens = {t: int(glob[i]) for i, t in enumerate(TASKS)}
    n_global = max(1, sum(task_tokens.values()))

    # Plain sum when every weight is 1, so the default objective is bitwise the unweighted one.
    weighted = None if not loss_weights or all(loss_weights[t] == 1.0 for t in TASKS) else {t: float(loss_weights[t]) for t in TASKS}
    sums = torch.zeros(len(TASKS), dtype=torch.float64)
    for mb in micro_batches:
        batch = mb.to(device, float_dtype)
        out = engine(batch, touch_all=touch_all)
        total = out.total_sum() if weighted is None else sum(w * out.loss_sum[t] for t, w in weighted.items())
        engine.backward(total * (dp_size / n_global), scale_wrt_gas=False)
        engine.step()
        sums += torch.stack([out.loss_sum[t].detach().double().cpu() for t in TASKS])
    sums = all_reduce_sum(sums.to(comm_dev), group=dp_group).cpu()
    loss = float(sums.sum()) / n_global
    applied = bool(engine.was_step_applied()) and math.isfinite(loss)
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else None
    return StepResult(
        loss=loss,
        task_loss={t: (float(sums[i]) / task_tokens[t] if task_tokens[t] else None) for i, t in enumerate(TASKS)},
        task_tokens=task_tokens,
        tokens=int(glob[len(TASKS)]),
        samples=int(glob[len(TASKS) + COUNT_NAMES.index("docs")]),
        applied=applied,
        grad_norm=norm,
        counts={n: float(glob[len(TASKS) + i]) for i, n in enumerate(COUNT_NAMES)},
    )
