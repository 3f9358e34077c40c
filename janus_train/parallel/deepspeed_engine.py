"""DeepSpeed ZeRO around a model: the config we generate, and the engine.

We generate the DeepSpeed JSON from our config instead of asking users for one, so batch
sizes, accumulation and precision can never disagree with the data loader.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

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
