"""Train-step throughput: janus-train's packed step vs transformers' Janus in a plain loop.

    python bench/train_step.py --model tiny [--attention sdpa] [--seq-len L] [--steps N]

Both systems train on the same documents (i.i.d. und/text/gen documents in the Janus-Pro
stage-2 ratio 2:3:5, as many as fill --rows rows by first fit, see janus_train/contracts/synthetic.py:fill_rows)
with AdamW and grad clipping, in this process, on the same device, from the same
weights; their steps are interleaved (ours, baseline, ours, ...) so a busy machine slows both
alike, and the median step time is reported.

  janus_train   documents packed into rows of --seq-len, block-diagonal causal attention,
                heads only on supervised positions, one forward/backward per step
  hf_baseline   transformers JanusForConditionalGeneration, one right-padded micro-batch per
                task (see bench/hf_baseline.py)

"Tokens" are non-pad document tokens (every token of every sample: text, image placeholders,
VQ codes), identical for both systems; supervised tokens/s are printed too. Model FLOPs use
the trainer's FLOP model on the packed batch's counts (bench/flops.py), the same for both
systems, so padding or recomputation never counts as useful work. Prints one JSON line per system, then the ratio, then (with --overhead, default
for tiny) our step vs a bare PyTorch loop on the same model and batch.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from janus_train.contracts.synthetic import DocMix, fill_rows  # noqa: E402
from bench.flops import MFU_FORMULA, device_peak, executed_flops_packed, executed_flops_padded, step_flops  # noqa: E402
from janus_train.contracts.batch import PackedBatch  # noqa: E402
from janus_train.models.janus.config import JanusConfig  # noqa: E402
from janus_train.models.janus.model import JanusModel  # noqa: E402

# Per-model defaults: (seq_len, packed rows per step). Document lengths follow
# DocMix.janus_pro (the data bench's Janus-Pro-sized data) scaled by seq_len / 4096; image
# tokens are the model's own (tiny 16, small 64, 1B 576).
DEFAULTS = {"tiny": (256, 4), "small": (1024, 6), "janus_pro_1b": (4096, 8)}


# ---------------------------------------------------------------------------------------
# The steps under test
# ---------------------------------------------------------------------------------------


def build_engine_step(model: JanusModel, batch: PackedBatch, zero_stage: int, dtype: torch.dtype, device: torch.device):
    """Our full train step exactly as launch/train.py runs it: stage-3 freeze rules, AdamW with
    the non-finite guard, a DeepSpeed ZeRO engine, and `train_step` (global token
    normalisation, per-task losses, FLOP counts, grad clipping) on one packed micro-batch."""
    from janus_train.parallel import deepspeed_engine as dse
    from janus_train.parallel.distributed import init_distributed
    from janus_train.models.janus.config import TRAINABLE
    from janus_train.training.optim import build_optimizer
    from janus_train.training.stages import apply_freeze
    from janus_train.training.step import train_step

    init_distributed()
    apply_freeze(model, list(TRAINABLE))
    opt, sched = build_optimizer(model, 1e-4, (0.9, 0.95), 1e-8, 0.0, 0, check_finite=zero_stage == 0)  # as the trainer builds it
    ds_cfg = dse.deepspeed_config(zero_stage, batch.num_rows, 1, 1, 1.0, dtype)
    engine = dse.build_engine(model, opt, sched, ds_cfg)
    return lambda: train_step(engine, [batch], 1, None, device, dtype, touch_all=False)


def bare_step(model: JanusModel, optimizer: torch.optim.Optimizer, batch: PackedBatch) -> None:
    """The least a loop can do with this model: forward, backward, AdamW step."""
    out = model(batch)
    (out.total_sum() / sum(out.num_tokens.values())).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, clock) -> float:
    _sync(device)
    t = clock()
    fn()
    _sync(device)
    return clock() - t


def interleaved(fns: dict[str, callable], steps: int, warmup: int, device: torch.device, clock=time.perf_counter) -> dict[str, list[float]]:
    """Run each fn warmup times, then `steps` rounds of one call each; per-call seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, clock))
    return times


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def build_model(cfg: JanusConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> JanusModel:
    torch.manual_seed(seed)
    with torch.device(device):
        model = JanusModel(cfg)
    model.init_weights(std=0.02, seed=seed)
    return model.to(dtype).train()


def system_record(name: str, step_s: list[float], docs, batch_tokens: int, flops: float, peak: float, peak_src: str, extra: dict) -> dict:
    med = statistics.median(step_s)
    tokens = sum(len(d) for d in docs)
    supervised = sum(int(d.target.sum()) for d in docs)
    return {
        "system": name,
        **extra,
        "step_s_median": round(med, 5),
        "step_s_all": [round(t, 5) for t in step_s],
        "tokens_per_step": tokens,
        "supervised_tokens_per_step": supervised,
        "processed_positions_per_step": batch_tokens,
        "pad_fraction": round(1 - tokens / batch_tokens, 4),
        "tokens_per_s": round(tokens / med, 2),
        "supervised_tokens_per_s": round(supervised / med, 2),
        "model_flops_per_step": flops,
        "model_tflops_per_s": round(flops / med / 1e12, 6),
        "mfu": round(flops / med / peak, 5),
        "peak_tflops": round(peak / 1e12, 4),
        "peak_source": peak_src,
        "mfu_formula": MFU_FORMULA,
        "tokens_counted": "non-pad document tokens",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(DEFAULTS))
    p.add_argument("--attention", default=None, help="flash|sdpa|flex|eager (default: flash on CUDA, sdpa on CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="packed row length (default per model)")
    p.add_argument("--rows", type=int, default=None, help="packed rows per step (default per model)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per system")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="our engine's DeepSpeed ZeRO stage (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                   help="wall: elapsed time; cpu: this process's CPU time, which other jobs on a shared "
                        "machine do not inflate (meaningful with --threads 1). auto: cpu on CPU with one "
                        "thread, else wall")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device peak used for MFU")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    p.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=None,
                   help="also time a bare PyTorch loop on our model (default: on for tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count-only", action="store_true",
                   help="build no model and time nothing: print the FLOPs each system would execute for this "
                        "step (padding and unneeded logits included) and their ratio (any size, any machine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    attention = args.attention or ("flash" if device.type == "cuda" else "sdpa")
    seq_len, rows = DEFAULTS[args.model]
    seq_len, rows = args.seq_len or seq_len, args.rows or rows
    mix = DocMix.janus_pro(scale=seq_len / 4096)
    overhead = args.overhead if args.overhead is not None else args.model == "tiny"

    cfg = JanusConfig.from_preset(args.model, {"attention": attention, "recompute": args.recompute})
    batch, docs = fill_rows(cfg, rows, seq_len, seed=args.seed, mix=mix)
    if args.count_only:
        from bench.hf_baseline import padded_task_batches

        ours_x = executed_flops_packed(cfg, batch)
        base_x = executed_flops_padded(cfg, padded_task_batches(docs, torch.device("cpu"), torch.float32))
        print(json.dumps({"count": "executed FLOPs per step (computed from shapes, not timed)", "model": args.model,
                          "seq_len": seq_len, "rows": rows, "docs": len(docs), "model_flops": step_flops(cfg, batch),
                          "janus_train": ours_x, "hf_baseline": base_x, "ratio_hf_over_ours": round(base_x / ours_x, 3)}))
        return 0
    batch = batch.to(device, float_dtype=dtype)
    flops = step_flops(cfg, batch)
    peak, peak_src = (args.peak_tflops * 1e12, "--peak-tflops") if args.peak_tflops else device_peak(device, dtype)
    extra = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "attention": attention,
        "seq_len": seq_len,
        "rows": rows,
        "docs": len(docs),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }

    ours = build_model(cfg, dtype, device, args.seed)
    init_sd = {k: v.clone() for k, v in ours.state_dict().items()}
    bare = copy.deepcopy(ours) if overhead else None
    fns = {"janus_train": build_engine_step(ours, batch, args.zero_stage, dtype, device)}
    if not args.no_baseline:
        from bench.hf_baseline import build_hf_model, hf_train_step, padded_task_batches

        hf = build_hf_model(cfg, init_sd, dtype, device)
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
        hf_batches = padded_task_batches(docs, device, dtype)
        fns["hf_baseline"] = lambda: hf_train_step(hf, hf_opt, hf_batches)
    if overhead:
        bare.vq.requires_grad_(False)
        bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
        fns["bare_loop"] = lambda: bare_step(bare, bare_opt, batch)
    use_cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu" and torch.get_num_threads() == 1)
    extra["clock"] = "process CPU time" if use_cpu_clock else "wall"
    times = interleaved(fns, args.steps, args.warmup, device, time.process_time if use_cpu_clock else time.perf_counter)

    records = {"janus_train": system_record("janus_train", times["janus_train"], docs, batch.num_rows * batch.seq_len, flops, peak, peak_src, extra)}
    print(json.dumps(records["janus_train"]))
    if "hf_baseline" in times:
        padded = sum(b.input_ids.numel() for b in hf_batches)
        records["hf_baseline"] = system_record("hf_baseline", times["hf_baseline"], docs, padded, flops, peak, peak_src, extra)
        print(json.dumps(records["hf_baseline"]))
        ratio = records["janus_train"]["tokens_per_s"] / records["hf_baseline"]["tokens_per_s"]
        print(json.dumps({"ratio": "janus_train/hf_baseline tokens_per_s", "value": round(ratio, 3), "goal": ">= 2.0",
                          "tokens_counted": "non-pad document tokens (same documents for both)"}))
    if "bare_loop" in times:
        ours_s, bare_s = statistics.median(times["janus_train"]), statistics.median(times["bare_loop"])
        print(json.dumps({"check": "overhead", "janus_train_step_s": round(ours_s, 5), "bare_loop_step_s": round(bare_s, 5),
                          "value": round(ours_s / bare_s, 3), "goal": "<= 1.3"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
