"""Whole weights out of a distributed model, and exact whole weights back into it.

    full_state_dict(module, zero_stage)   native keys -> whole fp32 tensors (rank 0 by default)
    set_master_weights(module, sd)        whole tensors -> the optimizer's fp32 masters

One path for every layout a model can be in: plain (one process), ZeRO-1/2/3-partitioned
under a DeepSpeed engine, tensor-parallel shards (megatron-core layers), or both. ZeRO parts
are reassembled with DeepSpeed's own accessors (`safe_get_full_fp32_param`, which returns the
optimizer's fp32 master copy of a trainable parameter; `GatheredParameters` for a frozen ZeRO-3
one), then TP shards are all-gathered along the dimension `TP_PLAN` names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from janus_train.parallel.tensor_parallel import gather_tp_param, is_tp_split, slice_tp_param


def _whole_param(param: torch.Tensor, zero_stage: int) -> torch.Tensor:
    """This parameter whole over the data-parallel group (still a TP shard), on CPU."""
    full = None
    if param.requires_grad and zero_stage > 0:
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)  # the fp32 master copy; a collective under ZeRO-3
    if full is None:
        if zero_stage == 3 and hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.detach().clone()
        else:
            full = param.detach()
    return full.to("cpu", copy=True)


def full_state_dict(
    module: nn.Module, zero_stage: int = 0, dtype: torch.dtype = torch.float32, dst: int | None = 0, trainable_only: bool = False
) -> dict[str, torch.Tensor] | None:
    """Whole native-key weights (and buffers) on global rank `dst` (None: on every rank).
    `trainable_only`: the parameters that train, no buffers (a LoRA run's adapters and modules
    to save; the frozen base is never gathered).

    Collective: every rank of the job calls it, with the same module structure. Trainable
    weights under ZeRO come from the optimizer's fp32 masters (not the bf16 working copies),
    so exports and stage hand-overs lose no precision. A tied weight appears under both names.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    keep = dst is None or rank == dst
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in seen:  # tied weights: one tensor, two names
            if keep:
                out[name] = out[seen[id(p)]]
            continue
        seen[id(p)] = name
        full = _whole_param(p, zero_stage)
        if is_tp_split(p):
            full = gather_tp_param(name, full)
        if keep:
            out[name] = full.to(dtype)
    for name, b in module.named_buffers():
        if keep and not trainable_only:
            out[name] = b.detach().to("cpu", copy=True)
    return out if keep else None


def set_master_weights(module: nn.Module, full_sd: dict[str, torch.Tensor]) -> None:
    """Overwrite the optimizer's fp32 master weights of the trainable parameters with exact
    values (this rank's TP slice of each).

    DeepSpeed creates the masters from the (bf16) module weights, which rounds them; after a
    stage hand-over or a topology change we have the exact fp32 weights and put them back.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    device = next(module.parameters()).device
    for name, p in module.named_parameters():
        if not p.requires_grad or name not in full_sd:
            continue
        value = slice_tp_param(name, full_sd[name]) if is_tp_split(p) else full_sd[name]
        safe_set_full_fp32_param(p, value.to(device=device, dtype=torch.float32))
