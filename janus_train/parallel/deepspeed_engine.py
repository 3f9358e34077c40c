"""DeepSpeed ZeRO around a model: the config we generate, and the engine.

We generate the DeepSpeed JSON from our config instead of asking users for one, so batch
sizes, accumulation and precision can never disagree with the data loader.

Every engine carries `universal_checkpoint_info` on its module (DeepSpeed writes it into each
checkpoint's mp_rank model states): how tensor parallelism split each parameter, which
DeepSpeed's `ds_to_universal` needs to merge TP slices when a run resumes on another topology
(checkpoint/universal.py).
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
    load_universal: bool = False,
) -> dict[str, Any]:
    """`load_universal`: the engine will load a DeepSpeed universal checkpoint (a resume on
    another topology); the key is absent otherwise, so the config is unchanged."""
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
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def universal_checkpoint_info() -> dict[str, Any]:
    """DeepSpeed's `universal_checkpoint_info` for our models, from TP_PLAN: parameters split
    along dim 1 (row-parallel: o_proj, down_proj) are merged along dim 1, those along dim 0 (the
    default) along dim 0, and every other parameter is replicated over the TP ranks (one pattern
    that matches any name TP_PLAN does not). Patterns are `re.match`ed against DeepSpeed's
    parameter names (ours). Recorded at any TP size, so every checkpoint can be converted."""
    from deepspeed.checkpoint.constants import (PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    from janus_train.parallel.tensor_parallel import TP_PLAN

    split = "|".join(f"(?:{p})" for p, _ in TP_PLAN)
    return {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        TP_REPLICATED_PARAMETER_PATTERNS: [f"(?!(?:{split})$)"],
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [f"(?:{p})$" for p, dim in TP_PLAN if dim == 1],
        # Ours, for readers of the checkpoint: the split dims by pattern (tensor_parallel.TP_PLAN).
        "janus_tp_plan": [[p, dim] for p, dim in TP_PLAN],
    }


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
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    # DeepSpeed saves the module's `universal_checkpoint_info` attribute with every checkpoint
    # (engine._save_checkpoint); ds_to_universal reads it back to merge TP slices.
    setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, universal_checkpoint_info())
    return engine
