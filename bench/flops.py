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

from janus_train.contracts.batch import PackedBatch
from janus_train.logging.mfu import FORMULA, component_sizes, device_peak_flops
from janus_train.logging.mfu import step_flops as _engine_step_flops
from janus_train.models.janus.config import JanusConfig
from janus_train.models.janus.config import TRAINABLE
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


# ---------------------------------------------------------------------------------------
# Work each system actually executes (padding and unneeded logits included): computed from
# shapes, not timed. Same per-parameter rule (6N per position, everything trainable but the
# VQ); attention counted as the causal half (2*s^2*d forward per layer) for both systems, which
# flatters the baseline (its padded, masked SDPA computes the full square).
# ---------------------------------------------------------------------------------------


def _common(cfg: JanusConfig, sizes, text_positions: float, gen_positions: float, images: float, gen_inputs: float) -> float:
    v = cfg.vision
    patches = images * cfg.num_image_tokens
    return (
        6.0 * sizes.lm_head * text_positions
        + 6.0 * sizes.gen_head * gen_positions
        + 6.0 * (sizes.vision * patches + v.num_layers * 2 * v.hidden_size * cfg.num_image_tokens**2 * images)
        + 6.0 * sizes.und_aligner * patches
        + 6.0 * sizes.gen_aligner * gen_inputs
    )


def executed_flops_packed(cfg: JanusConfig, batch: PackedBatch) -> float:
    """FLOPs our packed step executes: LLM over every row position (pad included), attention
    per document segment, heads on supervised positions only."""
    sizes = component_sizes(cfg)
    seg = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).double()
    sup = batch.supervised_tokens()
    images = 0 if batch.und_pixel_values is None else batch.und_pixel_values.shape[0]
    llm = 6.0 * sizes.llm_layers * batch.num_rows * batch.seq_len + 6.0 * cfg.llm.num_layers * cfg.llm.hidden_size * float((seg**2).sum())
    return llm + _common(cfg, sizes, sup["und"] + sup["text"], sup["gen"], images, float(batch.gen_input_mask.sum()))


def executed_flops_padded(cfg: JanusConfig, batches) -> float:
    """FLOPs the padded baseline executes: LLM and attention over every padded position, the
    lm_head over every position of its und/text batches, the gen head over every position of
    its gen batch (bench/hf_baseline.py)."""
    sizes = component_sizes(cfg)
    total = 0.0
    for b in batches:
        n, s = b.input_ids.shape
        total += 6.0 * sizes.llm_layers * n * s + 6.0 * cfg.llm.num_layers * cfg.llm.hidden_size * n * s * s
        images = 0 if b.pixel_values is None else b.pixel_values.shape[0]
        text_pos, gen_pos = (n * s, 0) if b.task in ("und", "text") else (0, n * s)
        total += _common(cfg, sizes, text_pos, gen_pos, images, float(b.gen_mask.sum()))
    return total
