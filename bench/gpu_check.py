"""One GPU acceptance check: the GPU paths that CPU tests cannot reach, in one command.

    bash bench/gpu_check.sh [--dry-run] [--rows N] [--steps N] ...

Three parts, each reported as status ok / failed / skipped (with the reason), so one failure
does not lose the other figures:

  attention_parity  flash-attn varlen (cu_seqlens) vs torch SDPA with the block-diagonal mask,
                    forward and backward in bf16 on the train step's packed rows, both through
                    `janus_train.models.attention.packed_attention`. Reported: max |flash - sdpa|
                    of the output and of dq, dk, dv; each is also compared with SDPA one
                    precision up (fp32; fp64 in the dry run) on the same inputs, and passes
                    when flash's error is at most twice SDPA-bf16's own error (the rule
                    flash-attn's own tests use, which scales with the dtype's rounding) plus
                    one bf16 rounding step of the largest value.
  train_step        janus_pro_1b (real size), bf16, DeepSpeed ZeRO-2 (the recipe's stage; on one
                    GPU it partitions nothing, but it is the engine path a run takes), our full
                    train step as bench/train_step.py builds it: tokens/s, MFU (the trainer's
                    FLOP model against the device's dense bf16 peak) and the peak memory the step
                    allocated, next to `janus_train.tools.memory_plan`'s prediction for the same
                    model, batch composition, ZeRO stage, dtype, attention and recomputation
                    (runtime overhead 0: the allocator's figure has no CUDA context in it).
  hf_baseline       the same documents and initial weights through transformers' Janus in a
                    plain loop (bench/hf_baseline.py): tokens/s, MFU, peak memory, and the ratio
                    of our tokens/s to its.

Unlike bench/train_step.py (which interleaves the two systems' steps in one process), the
parts run one after the other and each frees its model before the next, so each peak-memory
figure is that system's alone; a dedicated GPU does not need interleaving to be fair.

stdout carries exactly one JSON object (the report); everything else, including what
DeepSpeed and transformers print, goes to stderr. Exit status: 0 when no part failed, 1 when
one did, 2 when the check cannot start (no CUDA device without --dry-run).

--dry-run checks this script's own plumbing on CPU at tiny size: tiny preset, fp32, SDPA; the
flash-attn comparison is reported as skipped (flash-attn needs CUDA tensors) and eager
attention stands in for flash so the comparison code still runs; the train step and the
baseline run at tiny size. Same JSON keys as a GPU run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if TYPE_CHECKING:  # heavy imports stay inside the parts: the no-GPU refusal comes at once
    from janus_train.contracts.batch import Doc, PackedBatch
    from janus_train.models.attention import PackedDocs
    from janus_train.models.janus.config import JanusConfig
    from janus_train.tools.memory_plan import MemoryPlan

PARTS = ("attention_parity", "train_step", "hf_baseline")

# Every part's record has these keys whatever its status (None when not measured), so a
# consumer can read the same fields from an ok, failed or skipped part.
COMMON_FIELDS = ("status", "reason", "seconds")
PART_FIELDS: dict[str, tuple[str, ...]] = {
    "attention_parity": (
        "candidate", "reference", "dtype", "rows", "seq_len", "documents", "heads", "head_dim",
        "max_abs_diff", "error_vs_reference", "sdpa_error_vs_reference", "tolerance", "rule", "passed",
    ),
    "train_step": (
        "model", "dtype", "attention", "zero_stage", "recompute", "rows", "seq_len", "docs",
        "steps", "step_s_median", "step_s_all", "tokens_per_step", "tokens_per_s", "supervised_tokens_per_s",
        "model_flops_per_step", "model_tflops_per_s", "mfu", "peak_tflops", "peak_source", "mfu_formula",
        "pad_fraction", "peak_memory_gib", "peak_memory_reserved_gib", "peak_memory_source",
        "plan_peak_gib", "plan_parts_gib", "plan_over_measured",
    ),
    "hf_baseline": (
        "model", "dtype", "attention", "rows", "seq_len", "docs", "steps", "step_s_median", "step_s_all",
        "tokens_per_step", "tokens_per_s", "supervised_tokens_per_s", "model_flops_per_step",
        "model_tflops_per_s", "mfu", "pad_fraction", "peak_memory_gib", "peak_memory_reserved_gib",
        "peak_memory_source", "ratio_ours_over_hf_tokens_per_s", "ratio_goal",
    ),
}

GIB = 2**30

# Rows per step on the GPU: memory_plan puts janus_pro_1b at 4 x 4096 tokens, no
# recomputation, ZeRO-2, bf16 at ~74 GiB, inside one H100's 80 GB; bench/train_step.py's 8
# rows (~119 GiB) only fit an H200 (pass --rows 8 there).
GPU_ROWS = 4


class Skip(Exception):
    """A part that cannot run here, for a reason that is not a failure of the code under test."""


@dataclass
class Context:
    dry_run: bool
    device: torch.device
    dtype: torch.dtype
    model: str
    rows: int
    seq_len: int
    steps: int
    warmup: int
    zero_stage: int
    recompute: str
    seed: int


def log(msg: str) -> None:
    print(f"[gpu_check {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def finite(x: float) -> float | None:
    """A float JSON can carry (NaN/inf become null; the pass/fail verdicts are computed first)."""
    x = float(x)
    return x if math.isfinite(x) else None


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


# ---------------------------------------------------------------------------------------
# Shared set-up
# ---------------------------------------------------------------------------------------


def packed_batch(ctx: Context, attention: str, recompute: str = "none") -> tuple[JanusConfig, PackedBatch, list[Doc]]:
    """The train-step benchmark's packed rows: i.i.d. und/text/gen documents (2:3:5) by first fit."""
    from janus_train.contracts.synthetic import DocMix, fill_rows
    from janus_train.models.janus.config import JanusConfig

    cfg = JanusConfig.from_preset(ctx.model, {"attention": attention, "recompute": recompute})
    batch, docs = fill_rows(cfg, ctx.rows, ctx.seq_len, seed=ctx.seed, mix=DocMix.janus_pro(scale=ctx.seq_len / 4096))
    return cfg, batch, docs


class PeakMemory:
    """Bytes a part allocated at its peak above what was resident when the probe was made.

    CUDA: the caching allocator's max_memory_allocated (reset at `restart`, so building the
    model in fp32 before the cast does not count). CPU (dry run only): the process's RSS
    high-water mark, reset through /proc/self/clear_refs as bench/peak_memory.py does; coarse,
    it is there so the dry run exercises the same fields."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = self._current()

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        from bench.peak_memory import _rss_bytes

        return _rss_bytes()

    @property
    def source(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the timed steps, minus what was allocated before the part"
        return "process RSS high-water mark (VmHWM) during the steps, minus RSS before the part (CPU dry run)"

    def restart(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not permitted in some containers: the mark then covers the build too
            pass

    def peak(self) -> tuple[int, int | None]:
        """(allocated at the peak, reserved by the allocator at the peak or None on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base,
                    torch.cuda.max_memory_reserved(self.device))
        from bench.peak_memory import _hwm_bytes

        return _hwm_bytes() - self.base, None


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_steps(step: Callable[[], Any], ctx: Context, memory: PeakMemory) -> list[float]:
    """Warm-up steps (kernel selection, optimizer-state allocation), then the timed ones;
    the peak-memory window covers all of them (the first step allocates AdamW's states)."""
    from bench.train_step import interleaved

    memory.restart()
    return interleaved({"step": step}, ctx.steps, ctx.warmup, ctx.device)["step"]


# ---------------------------------------------------------------------------------------
# Part 1: flash-attn varlen vs SDPA
# ---------------------------------------------------------------------------------------


def _forward_backward(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs,
                      grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    from janus_train.models import attention

    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention.packed_attention(q, k, v, docs, backend)
    out.backward(grad_out)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def attention_parity(ctx: Context) -> dict[str, Any]:
    from janus_train.models import attention

    if ctx.dry_run:
        # flash-attn's kernel takes CUDA tensors only: on CPU eager attention stands in for it,
        # so the comparison, the reference and the verdict below still run end to end.
        candidate = "eager"
        skip_reason = (f"dry run on CPU: flash-attn needs CUDA (flash_attn importable: {_flash_importable()}, "
                       f"CUDA: {torch.cuda.is_available()}); eager attention stood in for it to check the comparison")
    else:
        if not attention.flash_available():
            raise RuntimeError("flash_attn is not importable on this CUDA machine (pip install flash-attn): "
                               "the flash-attn varlen path, the GPU default, is untested")
        candidate, skip_reason = "flash", None
    cfg, batch, _ = packed_batch(ctx, "sdpa")
    docs = attention.PackedDocs.from_cu_seqlens(batch.cu_seqlens.to(ctx.device), batch.max_seqlen, batch.num_rows, batch.seq_len)
    heads, head_dim = cfg.llm.num_heads, cfg.llm.head_dim
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    shape = (batch.num_rows, heads, batch.seq_len, head_dim)
    q, k, v, grad_out = (torch.randn(shape, generator=g, device=ctx.device, dtype=ctx.dtype) for _ in range(4))
    # The reference: SDPA one precision up, on the very same (rounded) inputs.
    ref_dtype = torch.float64 if ctx.dtype == torch.float32 else torch.float32
    ref = _forward_backward("sdpa", *(t.to(ref_dtype) for t in (q, k, v)), docs, grad_out.to(ref_dtype))
    sdpa = _forward_backward("sdpa", q, k, v, docs, grad_out)
    cand = _forward_backward(candidate, q, k, v, docs, grad_out)
    # Slack of one rounding step of the largest value (at least 1e-5): SDPA's fused GPU kernels
    # can be more exact than flash on some tensors by less than bf16 resolves, which says
    # nothing about flash; a wrong mask or layout is off by O(|value|) and still fails.
    eps = torch.finfo(ctx.dtype).eps
    diff, err, ref_err, tol, passed = {}, {}, {}, {}, True
    for name in ("out", "dq", "dk", "dv"):
        d = float((cand[name].float() - sdpa[name].float()).abs().max())
        e = float((cand[name].to(ref_dtype) - ref[name]).abs().max())
        re = float((sdpa[name].to(ref_dtype) - ref[name]).abs().max())
        t = 2.0 * re + max(eps * float(ref[name].abs().max()), 1e-5)
        passed &= e <= t  # False for NaN too
        diff[name], err[name], ref_err[name], tol[name] = finite(d), finite(e), finite(re), finite(t)
    rec = {
        "status": "ok" if passed else "failed",
        "reason": None if passed else f"{candidate} differs from the {str(ref_dtype).replace('torch.', '')} reference by more than the tolerance",
        "candidate": candidate, "reference": "sdpa (block-diagonal causal mask)",
        "dtype": str(ctx.dtype).replace("torch.", ""), "rows": batch.num_rows, "seq_len": batch.seq_len,
        "documents": len(docs.row_segments()), "heads": heads, "head_dim": head_dim,
        "max_abs_diff": diff, "error_vs_reference": err, "sdpa_error_vs_reference": ref_err, "tolerance": tol,
        "rule": f"max|{candidate} - ref| <= 2 * max|sdpa - ref| + max(eps * max|ref|, 1e-5) for out, dq, dk, dv "
                f"(eps of {str(ctx.dtype).replace('torch.', '')}); "
                f"ref = sdpa in {str(ref_dtype).replace('torch.', '')}; grads from a random upstream gradient",
        "passed": passed,
    }
    if skip_reason and passed:  # the dry run checked the plumbing; flash itself was not tested
        rec.update(status="skipped", reason=skip_reason)
    return rec


def _flash_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# Part 2: our train step, next to memory_plan
# ---------------------------------------------------------------------------------------


def plan_for(cfg: JanusConfig, batch: PackedBatch, ctx: Context, attention_used: str) -> MemoryPlan:
    """memory_plan's estimate for exactly this step: same model, batch composition, trainable
    set (stage-3 rules, as build_engine_step freezes), ZeRO stage, dtype, attention, recompute."""
    from janus_train.models import attention
    from janus_train.models.janus.config import TRAINABLE
    from janus_train.tools.memory_plan import PlanSettings, plan_memory

    sup = batch.supervised_tokens()
    by_document = False
    if attention_used == "sdpa" and ctx.device.type == "cpu":
        docs = attention.PackedDocs.from_cu_seqlens(batch.cu_seqlens, batch.max_seqlen, batch.num_rows, batch.seq_len)
        by_document = attention._by_document_pays(docs, cfg.llm.num_heads * cfg.llm.head_dim)
    settings = PlanSettings(
        model=cfg, trainable=list(TRAINABLE), zero_stage=ctx.zero_stage, dp=1, tp=1,
        micro_batch_rows=batch.num_rows, seq_len=batch.seq_len, dtype="bf16" if ctx.dtype == torch.bfloat16 else "fp32",
        recompute=cfg.recompute, recompute_every=cfg.recompute_every, attention=attention_used, engine="deepspeed",
        text_supervised=sup["und"] + sup["text"], gen_supervised=sup["gen"], gen_inputs=int(batch.gen_input_mask.sum()),
        und_images=0 if batch.und_pixel_values is None else int(batch.und_pixel_values.shape[0]),
        overhead_gib=0.0, sdpa_by_document=by_document,
    )
    return plan_memory(settings)


def _system_fields(name: str, times: list[float], docs: list[Doc], positions: int, flops: float, ctx: Context,
                   attention_used: str) -> dict[str, Any]:
    from bench.flops import device_peak
    from bench.train_step import system_record

    peak, peak_src = device_peak(ctx.device, ctx.dtype)
    extra = {"model": ctx.model, "dtype": str(ctx.dtype).replace("torch.", ""), "attention": attention_used,
             "rows": ctx.rows, "seq_len": ctx.seq_len, "docs": len(docs), "steps": len(times)}
    return system_record(name, times, docs, positions, flops, peak, peak_src, extra)


def train_step_part(ctx: Context) -> dict[str, Any]:
    from bench.flops import step_flops
    from bench.train_step import build_engine_step, build_model
    from janus_train.models import attention

    attention_used = attention.resolve_backend("sdpa" if ctx.dry_run else "flash")
    cfg, batch, docs = packed_batch(ctx, attention_used, ctx.recompute)
    plan = plan_for(cfg, batch, ctx, attention_used)
    batch = batch.to(ctx.device, float_dtype=ctx.dtype)
    flops = step_flops(cfg, batch)
    memory = PeakMemory(ctx.device)
    if ctx.device.type == "cuda":  # what an earlier part left behind would shrink the room left
        log(f"train_step: {gib(memory.base)} GiB allocated before the part")
    log(f"train_step: building {ctx.model} ({ctx.rows} x {ctx.seq_len}, {ctx.dtype}, {attention_used}, ZeRO-{ctx.zero_stage})")
    model = build_model(cfg, ctx.dtype, ctx.device, ctx.seed)
    step = build_engine_step(model, batch, ctx.zero_stage, ctx.dtype, ctx.device)
    log(f"train_step: {ctx.warmup} warm-up + {ctx.steps} timed steps")
    times = timed_steps(step, ctx, memory)
    allocated, reserved = memory.peak()
    rec = _system_fields("janus_train", times, docs, batch.num_rows * batch.seq_len, flops, ctx, attention_used)
    rec.update(
        status="ok", zero_stage=ctx.zero_stage, recompute=cfg.recompute,
        peak_memory_gib=gib(allocated), peak_memory_reserved_gib=gib(reserved), peak_memory_source=memory.source,
        plan_peak_gib=gib(plan.peak),
        plan_parts_gib={k: gib(getattr(plan, k)) for k in ("params", "grads", "optimizer", "activations", "transient", "buffers")},
        plan_over_measured=round(plan.peak / allocated, 3) if allocated > 0 else None,
    )
    if not ctx.dry_run and attention_used != "flash":
        rec.update(status="failed", reason=f"the step ran with attention={attention_used}, not flash")
    return rec


# ---------------------------------------------------------------------------------------
# Part 3: the transformers baseline
# ---------------------------------------------------------------------------------------


def hf_baseline_part(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from bench.flops import step_flops
    from bench.hf_baseline import build_hf_model, hf_train_step, padded_task_batches
    from bench.train_step import build_model

    cfg, batch, docs = packed_batch(ctx, "sdpa")
    flops = step_flops(cfg, batch)  # the same useful work as ours: the same documents
    memory = PeakMemory(ctx.device)
    if ctx.device.type == "cuda":
        log(f"hf_baseline: {gib(memory.base)} GiB allocated before the part")
    log(f"hf_baseline: building transformers' Janus with our initial weights ({ctx.model})")
    # Same seed as the train_step part: the same initial weights, whether or not it ran.
    ours = build_model(cfg, ctx.dtype, ctx.device, ctx.seed)
    hf = build_hf_model(cfg, ours.state_dict(), ctx.dtype, ctx.device)
    del ours
    release_memory(ctx.device)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    hf_batches = padded_task_batches(docs, ctx.device, ctx.dtype)
    log(f"hf_baseline: {ctx.warmup} warm-up + {ctx.steps} timed steps")
    times = timed_steps(lambda: hf_train_step(hf, opt, hf_batches), ctx, memory)
    allocated, reserved = memory.peak()
    padded = sum(b.input_ids.numel() for b in hf_batches)
    rec = _system_fields("hf_baseline", times, docs, padded, flops, ctx, "sdpa")
    mine = results.get("train_step", {})
    ratio = (round(mine["tokens_per_s"] / rec["tokens_per_s"], 3)
             if mine.get("status") == "ok" and mine.get("tokens_per_s") and rec["tokens_per_s"] else None)
    rec.update(status="ok", peak_memory_gib=gib(allocated), peak_memory_reserved_gib=gib(reserved),
               peak_memory_source=memory.source, ratio_ours_over_hf_tokens_per_s=ratio, ratio_goal=">= 2.0 (not a pass/fail criterion here)")
    if ratio is None:
        rec["reason"] = "no ratio: the train_step part did not produce tokens/s"
    return rec


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def run_part(name: str, fn: Callable[[], dict[str, Any]], ctx: Context) -> dict[str, Any]:
    log(f"== {name}")
    t0 = time.perf_counter()
    try:
        got = fn()
    except Skip as e:
        got = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 -- one part's failure must not lose the others' figures
        traceback.print_exc(file=sys.stderr)
        got = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:500]}"}
    finally:
        release_memory(ctx.device)
    rec: dict[str, Any] = {k: None for k in (*COMMON_FIELDS, *PART_FIELDS[name])}
    rec.update({k: v for k, v in got.items() if k in rec})  # the documented keys, nothing else
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"{name}: {rec['status']}" + (f" ({rec['reason']})" if rec["reason"] else ""))
    return rec


def _not_selected() -> dict[str, Any]:
    raise Skip("not in --parts")


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("flash-attn", "deepspeed", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash bench/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="check this script's plumbing on CPU at tiny size (tiny preset, fp32, SDPA; flash-attn part skipped)")
    p.add_argument("--rows", type=int, default=None, help=f"packed rows per step (default {GPU_ROWS} on the GPU, tiny's default in a dry run)")
    p.add_argument("--seq-len", type=int, default=None, help="packed row length (default 4096 on the GPU, 256 in a dry run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per system (default 5; 2 in a dry run)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 in a dry run)")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage of our step (default 2, the recipe's)")
    p.add_argument("--recompute", default="none", choices=["none", "full", "selective"],
                   help="activation recomputation of our step (default none: MFU counts no recomputed work)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (others reported as skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def context_from_args(args: argparse.Namespace) -> Context:
    from bench.train_step import DEFAULTS

    model = "tiny" if args.dry_run else "janus_pro_1b"
    seq_len, rows = DEFAULTS[model]
    return Context(
        dry_run=args.dry_run,
        device=torch.device("cpu" if args.dry_run else "cuda"),
        dtype=torch.float32 if args.dry_run else torch.bfloat16,
        model=model,
        rows=args.rows or (rows if args.dry_run else GPU_ROWS),
        seq_len=args.seq_len or seq_len,
        steps=args.steps or (2 if args.dry_run else 5),
        warmup=args.warmup if args.warmup is not None else (1 if args.dry_run else 2),
        zero_stage=args.zero_stage,
        recompute=args.recompute,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device: use --dry-run (checks this script's plumbing on CPU at tiny size)", file=sys.stderr)
        return 2
    # The report is the only thing on stdout: keep the real stdout for it, and send fd 1
    # (DeepSpeed's logger, transformers, C++ prints) to stderr for the rest of the run.
    sys.stdout.flush()
    report_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = context_from_args(args)
    t0 = time.perf_counter()
    wanted = set(args.parts.split(","))
    results: dict[str, Any] = {}
    runners = {
        "attention_parity": lambda: attention_parity(ctx),
        "train_step": lambda: train_step_part(ctx),
        "hf_baseline": lambda: hf_baseline_part(ctx, results),
    }
    for name in PARTS:
        if name in wanted:
            results[name] = run_part(name, runners[name], ctx)
        else:
            results[name] = run_part(name, _not_selected, ctx)
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    report = {
        "check": "janus-train GPU acceptance (issue 15 item 6)",
        "mode": "dry-run" if ctx.dry_run else "gpu",
        "status": "failed" if failed else "ok",
        "failed_parts": failed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": _versions(),
        "seconds": round(time.perf_counter() - t0, 1),
        "parts": results,
    }
    report_out.write(json.dumps(report) + "\n")
    report_out.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
