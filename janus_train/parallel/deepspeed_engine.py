"""DeepSpeed ZeRO around a JanusModel: the config we generate, the engine, whole weights back.

We generate the DeepSpeed JSON from our config instead of asking users for one, so batch
sizes, accumulation and precision can never disagree with the data loader.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("janus_train")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp32 otherwise (CPU)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        if device.type == "cpu":
            log.warning("parallel.dtype=bf16 on CPU: DeepSpeed's CPU path is slow and mostly untested in bf16")
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def deepspeed_config(
    zero_stage: int,
    micro_batch_rows: int,
    grad_accum_steps: int,
    dp_size: int,
    grad_clip: float,
    dtype: torch.dtype,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_rows,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_rows * grad_accum_steps * dp_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        # Our own client optimizer (AdamW with a non-finite guard) is not on DeepSpeed's list.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        cfg["zero_optimization"].update(
            {
                # Keep small tensors (norms, biases) whole on every rank: gathering them costs
                # more than it saves.
                "stage3_param_persistence_threshold": 10_000,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if dtype == torch.bfloat16:
        # Skip the step on a NaN/inf gradient norm in bf16 too (fp32 does it by default).
        cfg["bf16"]["check_grad_overflow"] = True
    return cfg


def build_engine(model: torch.nn.Module, optimizer, scheduler, ds_config: dict, mpu=None):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=mpu,
        dist_init_required=False,
    )
    return engine


def _full_param(engine, param: torch.Tensor) -> torch.Tensor | None:
    """This parameter whole (over the data-parallel group), on CPU, or None off rank 0."""
    from deepspeed.utils import safe_get_full_fp32_param

    stage = engine.zero_optimization_stage()
    full = None
    if param.requires_grad and stage > 0:
        full = safe_get_full_fp32_param(param)  # the fp32 master copy; a collective under ZeRO-3
    if full is None:
        if stage == 3 and hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.detach().clone()
        else:
            full = param.detach()
    return full.to("cpu", copy=True)


def consolidated_state_dict(engine, dtype: torch.dtype = torch.float32, tp_gather=None) -> dict[str, torch.Tensor] | None:
    """Whole native-key weights on rank 0 (None elsewhere); every rank must call it.

    Trainable weights come from the optimizer's fp32 master copies (not the bf16 working
    copies), so exports and stage hand-overs lose no precision. `tp_gather(name, tensor)`
    reassembles tensor-parallel shards when TP is on.
    """
    module = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights: one tensor, two names
            if rank == 0:
                out[name] = out[seen[id(p)]]
            continue
        seen[id(p)] = name
        full = _full_param(engine, p)
        if tp_gather is not None:
            full = tp_gather(name, full)
        if rank == 0:
            out[name] = full.to(dtype)
    for name, b in module.named_buffers():
        if rank == 0:
            out[name] = b.detach().to("cpu", copy=True)
    return out if rank == 0 else None


def set_master_weights(engine, full_sd: dict[str, torch.Tensor], tp_slice=None) -> None:
    """Overwrite the optimizer's fp32 master weights with exact values.

    DeepSpeed creates the masters from the (bf16) module weights, which rounds them; after a
    stage hand-over or a topology change we have the exact fp32 weights and put them back.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    device = next(engine.module.parameters()).device
    for name, p in engine.module.named_parameters():
        if not p.requires_grad or name not in full_sd:
            continue
        value = full_sd[name]
        if tp_slice is not None:
            value = tp_slice(name, value)
        elif getattr(p, "tensor_model_parallel", False):
            # parallel.tp > 1: this rank holds a shard; take its slice of the whole tensor.
            from janus_train.parallel.tensor_parallel import slice_tp_param

            value = slice_tp_param(name, value)
        safe_set_full_fp32_param(p, value.to(device=device, dtype=torch.float32))
