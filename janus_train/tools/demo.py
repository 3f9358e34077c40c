"""`make demo`: the whole Janus-Pro recipe at tiny size on CPU, with no downloads.

    python -m janus_train.tools.demo [--out demo_out] [--nproc 2] [extra Hydra overrides ...]

Runs `deepspeed --num_gpus N launch/train.py +recipe=tiny_demo` (2 CPU ranks, gloo, ZeRO-2):
a tiny random Janus and the synthetic shapes dataset are built on the fly, then the three
stages run shortened. Afterwards it prints where the metrics, samples and exports are, and
whether every task's loss fell (mean of its last 20% of steps below its first 20%).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASKS = ("und", "text", "gen")


def loss_trend(metrics: list[dict]) -> dict[str, tuple[float, float] | None]:
    """Per task: (mean loss over its first 20% of steps, over its last 20%); None if absent."""
    out: dict[str, tuple[float, float] | None] = {}
    for task in TASKS:
        vals = [m[f"loss_{task}"] for m in metrics if isinstance(m.get(f"loss_{task}"), float)]
        if len(vals) < 5:
            out[task] = None
            continue
        k = max(1, len(vals) // 5)
        out[task] = (sum(vals[:k]) / k, sum(vals[-k:]) / k)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m janus_train.tools.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="directory for the data, the run and its outputs (default demo_out)")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks for the deepspeed launcher (default 2)")
    p.add_argument("--fresh", action="store_true", help="delete a previous run in --out first (the data is kept)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for launch/train.py")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    run_dir = out / "run"
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    # Build the inputs here, before any rank exists (see tools/demo_assets.py).
    from janus_train.tools.demo_assets import build_demo_assets

    build_demo_assets(out / "data", out / "data" / "tiny_init", "tiny", 1500, 1234)
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(deepspeed) if deepspeed.exists() else "deepspeed",
        "--num_gpus", str(args.nproc),
        str(REPO / "launch" / "train.py"),
        "+recipe=tiny_demo",
        f"run_dir={run_dir}",
        f"data.root={out / 'data'}",
        *args.overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.time()
    code = subprocess.call(cmd, env=env, cwd=REPO)
    minutes = (time.time() - t0) / 60
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {"state": "unknown"}
    if code != 0 or status.get("state") != "completed":
        print(f"demo failed (exit {code}, state {status.get('state')}); see the output above", file=sys.stderr)
        return code or 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trend = loss_trend(metrics)
    print(f"\njanus-train demo finished in {minutes:.1f} min ({len(metrics)} steps, 3 stages, {args.nproc} CPU ranks)")
    print(f"  metrics : {run_dir / 'metrics.jsonl'}")
    print(f"  samples : {run_dir / 'samples'}")
    print(f"  exports : {run_dir / 'exports'} (HF format, one per stage; try python -m janus_train.generate --ckpt {run_dir / 'exports' / 'stage3'} ...)")
    print(f"  wandb   : {run_dir / 'wandb'} (offline; `wandb sync` to upload)")
    falling = True
    for task, t in trend.items():
        if t is None:
            print(f"  loss {task:<4}: too few steps with this task")
            continue
        ok = t[1] < t[0]
        falling &= ok
        print(f"  loss {task:<4}: first 20% {t[0]:.3f} -> last 20% {t[1]:.3f}  {'falls' if ok else 'DOES NOT FALL'}")
    return 0 if falling else 4


if __name__ == "__main__":
    sys.exit(main())
