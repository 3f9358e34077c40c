"""Model FLOPs of a benchmark step and the peak MFU is quoted against.

The FLOP model is the trainer's own (janus_train/logging/mfu.py, formula in
`janus_train.logging.mfu.FORMULA`), fed with the same per-batch counts the train step
all-reduces (`janus_train.training.step.batch_counts`), so the benchmark's MFU and a training
run's logged MFU are the same quantity. Both systems in a benchmark train on the same
documents, so they get the same model FLOPs per step: padding, unneeded logits and
recomputation are never counted as useful work.
"""

from __future__ import annotations

import time

import torch

from janus_train.data.batch import PackedBatch
from janus_train.logging.mfu import FORMULA, component_sizes, device_peak_flops
from janus_train.logging.mfu import step_flops as _engine_step_flops
from janus_train.models.janus.config import JanusConfig
from janus_train.training.config import TRAINABLE
from janus_train.training.step import COUNT_NAMES, batch_counts

MFU_FORMULA = f"MFU = model_flops / step_time / peak; {FORMULA}; all components trainable except the VQ (stage-3 rules)"


def step_flops(cfg: JanusConfig, batch: PackedBatch, trainable: list[str] | None = None) -> float:
    """Model FLOPs of one train step on `batch` (the trainer's formula)."""
    counts = dict(zip(COUNT_NAMES, batch_counts(batch).tolist()))
    return _engine_step_flops(cfg, component_sizes(cfg), list(trainable or TRAINABLE), counts)


def measured_cpu_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n matmuls on this CPU, at the current thread count."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): a known GPU's dense bf16 peak, or a measured CPU one."""
    if device.type == "cuda":
        peak = device_peak_flops(device, None)
        if peak is None:
            raise ValueError(f"no peak FLOP/s known for {torch.cuda.get_device_name(device)!r}; pass --peak-tflops")
        return peak, f"{torch.cuda.get_device_name(device)} dense bf16 spec peak"
    name = str(dtype).replace("torch.", "")
    return measured_cpu_peak(dtype), f"measured CPU {name} 1024^3 matmul peak, {torch.get_num_threads()} threads"
