"""Measured peak memory of a CPU train step next to the memory plan's estimate.

    python bench/peak_memory.py --model tiny --rows 16 --seq-len 512 [--recompute full]
    python bench/peak_memory.py --model janusflow_tiny --rows 16 --seq-len 512 --ratio 1:1:4

Measurement (in a fresh child process, so nothing else is resident): build the packed batch,
run one warm-up step of a 1-block copy of the model (thread pools and kernels initialise
here, not inside the measurement), then take the resident set size (RSS) as the baseline and
reset the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`). Build the model and
AdamW and run two train steps (the second has optimizer states resident, like every later
step). Measured = VmHWM - baseline: everything the step allocated at its peak, as the OS saw
it. glibc is told to serve allocations above 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so
freed tensors go back to the OS and the high-water mark tracks live tensors, not heap
fragmentation.

The batch is `contracts.synthetic`'s mixed und/text/gen rows (`--ratio` und:text:gen documents;
for a JanusFlow model the gen documents carry latents, noise, times and REPA images). The
estimate is `plan_memory` for the same model, batch composition and checkpointing, with
engine=torch (a plain loop: fp32 weights and gradients, AdamW's two fp32 states, no DeepSpeed
buffers) and no GPU runtime overhead. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _step(model, opt, batch) -> None:
    out = model(batch)
    if hasattr(out, "total_sum"):  # Janus-Pro
        (out.total_sum() / sum(out.num_tokens.values())).backward()
    else:  # JanusFlow: each loss over its own count
        sum(v / max(int(out.count[k]), 1) for k, v in out.loss_sum.items()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def child(args) -> dict:
    import torch

    from janus_train.contracts.synthetic import batch_with_rows
    from janus_train.models.families import family_of_preset

    torch.set_num_threads(args.threads)
    family = family_of_preset(args.model)
    overrides = {"attention": args.attention, "recompute": args.recompute, "recompute_every": args.recompute_every}
    cfg = family.config(args.model, overrides)
    batch = batch_with_rows(cfg, args.rows, args.seq_len, seed=args.seed, mix=_mix(args))
    # Warm-up on a one-block model: allocator, thread pools and kernels initialise outside the window.
    one_block = {"llm.num_layers": 1, **({"flow.repa_layer": 1} if family.gen_kind == "flow" else {})}
    warm = family.build(family.config(args.model, {**overrides, **one_block}))
    _step(warm, torch.optim.AdamW(warm.parameters()), batch)
    del warm
    gc.collect()
    base = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    model = family.build(cfg)
    model.init_weights(seed=args.seed)
    model.train()
    if args.head_chunk:
        from janus_train.parallel.chunked_loss import apply_chunked_head_loss

        apply_chunked_head_loss(model, args.head_chunk)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        _step(model, opt, batch)
    measured = _hwm_bytes() - base
    sup = batch.supervised_tokens()
    from janus_train.models import attention

    docs = attention.PackedDocs.from_cu_seqlens(batch.cu_seqlens, batch.max_seqlen, batch.num_rows, batch.seq_len)
    return {
        "sdpa_by_document": args.attention == "sdpa" and attention._by_document_pays(docs, cfg.llm.hidden_size),
        "measured_bytes": measured,
        "text_supervised": sup["und"] + sup["text"],
        "gen_supervised": sup["gen"],
        "gen_inputs": int(batch.gen_input_mask.sum()),
        "und_images": 0 if batch.und_pixel_values is None else int(batch.und_pixel_values.shape[0]),
        "gen_images": batch.num_gen_docs,
    }


def _mix(args):
    from janus_train.contracts.synthetic import DocMix

    ratio = tuple(int(x) for x in args.ratio.split(":"))
    if len(ratio) != 3 or min(ratio) < 0 or not sum(ratio):
        raise SystemExit(f"--ratio {args.ratio!r}: three non-negative integers und:text:gen")
    return DocMix(ratio=ratio)


def estimate(args, composition: dict):
    from janus_train.models.families import family_of_preset
    from janus_train.tools.memory_plan import PlanSettings, plan_memory

    family = family_of_preset(args.model)
    cfg = family.config(args.model, {"attention": args.attention})
    trainable = [c for c in family.components if c not in family.always_frozen]
    settings = PlanSettings(
        model=cfg, trainable=trainable, zero_stage=0, dp=1, tp=1, micro_batch_rows=args.rows, seq_len=args.seq_len,
        dtype="fp32", recompute=args.recompute, recompute_every=args.recompute_every, attention=args.attention,
        engine="torch", text_supervised=composition["text_supervised"], gen_supervised=composition["gen_supervised"],
        gen_inputs=composition["gen_inputs"], und_images=composition["und_images"], gen_images=composition["gen_images"], overhead_gib=0.0,
        head_chunk_tokens=args.head_chunk, sdpa_by_document=composition["sdpa_by_document"],
    )
    return plan_memory(settings)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "small", "janusflow_tiny", "janusflow_mini32"])
    p.add_argument("--ratio", default="2:3:5", help="und:text:gen documents in the batch (default 2:3:5)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    p.add_argument("--recompute-every", type=int, default=2)
    p.add_argument("--head-chunk", type=int, default=None, help="chunked head CE with this many tokens per chunk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run([sys.executable, __file__, *argv, "--child"], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    comp = json.loads(proc.stdout.strip().splitlines()[-1])
    plan = estimate(args, comp)
    measured = comp["measured_bytes"]
    print(json.dumps({
        "model": args.model, "rows": args.rows, "seq_len": args.seq_len, "ratio": args.ratio, "attention": args.attention,
        "recompute": args.recompute, "recompute_every": args.recompute_every, "head_chunk": args.head_chunk, **comp,
        "estimated_bytes": int(plan.peak), "ratio_estimate_over_measured": round(plan.peak / measured, 4),
        "estimate_parts_mib": {k: round(v / 2**20, 2) for k, v in
                               {"params": plan.params, "grads": plan.grads, "optimizer": plan.optimizer,
                                "activations": plan.activations, "transient": plan.transient}.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
