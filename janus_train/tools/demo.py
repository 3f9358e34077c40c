"""`make demo`: the whole recipe at mini size on CPU, with no downloads, evaluated as it trains.

    python -m janus_train.tools.demo [--out demo_out] [--nproc 2] [--fresh] [--recipe tiny_demo] [overrides ...]
    python -m janus_train.tools.demo --recipe janusflow_tiny_demo --out demo_out/janusflow   (`make demo-flow`)

Builds the demo's inputs first (janus_train/tools/demo_assets.py: the shapes world with a
held-out split, a mini VQ tokenizer trained on its images, the init checkpoint), then runs
`deepspeed --num_gpus N launch/train.py +recipe=tiny_demo` (2 CPU ranks, gloo, ZeRO-2): three
shortened stages, each ending with an evaluation on held-out data. It ends with the evaluation
table (validation losses, understanding and generation accuracy per stage), where the metrics,
sample grids and exports are, and whether every task's loss fell (JanusFlow: und, text, flow
and REPA). A second run finds the finished run and says so (it trains nothing) before showing its
results again; --fresh deletes the previous run and trains anew (the data is kept). The data is
built only when the run uses the demo's own (tools/demo_assets.py: uses_demo_data). With
`--recipe janusflow_tiny_demo` the tokenizer is a tiny VAE and the model JanusFlow
(docs/janusflow.md#the-demo).
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
# The per-step losses whose trend the report shows (those a run has: gen for Janus-Pro, flow and
# repa for JanusFlow).
TASKS = ("und", "text", "gen", "flow", "repa")
# Columns of the evaluation table: metrics.jsonl key -> header.
EVAL_COLUMNS = {"eval/loss_und": "val loss und", "eval/loss_text": "val loss text", "eval/loss_gen": "val loss gen",
                "eval/loss_flow": "val loss flow", "eval/loss_repa": "val loss repa",  # JanusFlow's gen losses
                "eval/und_acc": "und acc", "eval/und_acc_color": "colour qs", "eval/und_acc_shape": "shape qs",
                "eval/gen_acc": "gen acc"}


def loss_trend(metrics: list[dict]) -> dict[str, tuple[float, float] | None]:
    """Per task: (mean loss over its first 20% of steps, over its last 20%); None if absent."""
    out: dict[str, tuple[float, float] | None] = {}
    for task in TASKS:
        if not any(f"loss_{task}" in m and m[f"loss_{task}"] is not None for m in metrics) and task in ("gen", "flow", "repa"):
            continue  # the other family's loss
        vals = [m[f"loss_{task}"] for m in metrics if isinstance(m.get(f"loss_{task}"), float)]
        if len(vals) < 5:
            out[task] = None
            continue
        k = max(1, len(vals) // 5)
        out[task] = (sum(vals[:k]) / k, sum(vals[-k:]) / k)
    return out


def eval_table(metrics: list[dict]) -> str:
    """One row per evaluation in metrics.jsonl (step, stage, then EVAL_COLUMNS)."""
    rows = [m for m in metrics if any(k.startswith("eval/") for k in m)]
    if not rows:
        return "  (no evaluation in this run)"
    cols = [c for c in EVAL_COLUMNS if any(c in r for r in rows)]
    head = f"  {'step':>6} {'stage':>5} " + " ".join(f"{EVAL_COLUMNS[c]:>13}" for c in cols)
    lines = [head]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>13.3f}" if isinstance(v, (int, float)) else f"{'-':>13}")
        lines.append(f"  {r['step']:>6} {r['stage']:>5} " + " ".join(cells))
    return "\n".join(lines)


def report(run_dir: Path, minutes: float | None, nproc: int) -> int:
    """The results of the run in run_dir; `minutes`: how long this invocation trained (None: it
    trained nothing, the results are an earlier run's)."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "loss" in m]
    stages = len({m["stage"] for m in steps})
    if minutes is not None:
        print(f"\njanus-train demo finished in {minutes:.1f} min ({len(steps)} steps, {stages} stages, {nproc} CPU ranks)")
    else:
        print(f"\njanus-train demo: the results of the earlier run in {run_dir} ({len(steps)} steps, {stages} stages)")
    print("\nEvaluation on held-out data (und acc: exact answers; gen acc: requested shape and colour drawn, shapes scorer):")
    print(eval_table(metrics))
    last_grid = sorted((run_dir / "eval").glob("step_*/gen_grid.png"))
    print(f"\n  metrics : {run_dir / 'metrics.jsonl'}")
    print(f"  eval    : {run_dir / 'eval'} (report.json and gen_grid.png per evaluation{'; last: ' + str(last_grid[-1]) if last_grid else ''})")
    print(f"  samples : {run_dir / 'samples'}")
    flow = any(m.get("loss_flow") is not None for m in steps)
    layout = "DeepSeek's release layout" if flow else "HF format"
    vae = " --vae <data>/tokenizer" if flow else ""
    print(f"  exports : {run_dir / 'exports'} ({layout}, one per stage; try python -m janus_train.generate --ckpt {run_dir / 'exports' / 'stage3'}{vae} ...)")
    print(f"  wandb   : {run_dir / 'wandb'} (offline; `wandb sync` to upload)")
    falling = True
    for task, t in loss_trend(steps).items():
        if t is None:
            print(f"  loss {task:<4}: too few steps with this task")
            continue
        ok = t[1] < t[0]
        falling &= ok
        print(f"  loss {task:<4}: first 20% {t[0]:.3f} -> last 20% {t[1]:.3f}  {'falls' if ok else 'DOES NOT FALL'}")
    return 0 if falling else 4


def trained_step(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (0: none)."""
    from janus_train.checkpoint.manager import complete_checkpoints

    found = complete_checkpoints(run_dir / "checkpoints")
    return found[-1][0].step if found else 0


def already_ran(run_dir: Path) -> None:
    print(f"The demo already ran to completion in {run_dir}: nothing was trained this time; its results follow. "
          f"To train it afresh: python -m janus_train.tools.demo --fresh (or make demo DEMO_ARGS=--fresh), which deletes "
          f"that run (the data is kept).", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m janus_train.tools.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="directory for the data, the run and its outputs (default demo_out)")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks for the deepspeed launcher (default 2)")
    p.add_argument("--fresh", action="store_true", help="delete a previous run in --out first (the data is kept)")
    p.add_argument("--recipe", default="tiny_demo", help="the recipe to run (default tiny_demo; tiny_learn trains longer)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for launch/train.py")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    run_dir = out / "run"
    if args.fresh and run_dir.exists():
        print(f"--fresh: deleting the previous run in {run_dir} (the data in {out / 'data'} is kept)", flush=True)
        shutil.rmtree(run_dir)
    status_file = run_dir / "status.json"
    if not args.overrides and status_file.is_file() and json.loads(status_file.read_text()).get("state") == "completed":
        # With overrides (e.g. longer stages) the run is launched: it continues if they ask for more.
        already_ran(run_dir)
        return report(run_dir, None, args.nproc)
    # Build the inputs here, before any rank exists (see tools/demo_assets.py), with the
    # recipe's own settings.
    from janus_train.tools.demo_assets import (
        WorldSpec,
        build_demo_assets,
        uses_demo_data,
    )
    from janus_train.training.config import load_config

    cfg = load_config([f"+recipe={args.recipe}", f"data.root={out / 'data'}", *args.overrides])
    d = cfg.demo_assets
    demo, why = uses_demo_data(cfg)
    if demo:
        build_demo_assets(out / "data", Path(cfg.model.init_from), str(cfg.model.preset), int(d.num_samples), int(cfg.seed),
                          int(d.held_out), int(d.tokenizer_steps), WorldSpec.of(d))
    else:
        print(f"not building the demo's assets: {why}", flush=True)
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(deepspeed) if deepspeed.exists() else "deepspeed",
        "--num_gpus", str(args.nproc),
        str(REPO / "launch" / "train.py"),
        f"+recipe={args.recipe}",
        f"run_dir={run_dir}",
        f"data.root={out / 'data'}",
        *args.overrides,
    ]
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    print("+ " + " ".join(cmd), flush=True)
    before = trained_step(run_dir)
    t0 = time.time()
    code = subprocess.call(cmd, env=env, cwd=REPO)
    minutes = (time.time() - t0) / 60
    status = json.loads(status_file.read_text()) if status_file.is_file() else {"state": "unknown"}
    if code != 0 or status.get("state") != "completed":
        print(f"demo failed (exit {code}, state {status.get('state')}); see the output above", file=sys.stderr)
        return code or 1
    if before and trained_step(run_dir) == before:  # it resumed a finished run
        already_ran(run_dir)
        return report(run_dir, None, args.nproc)
    return report(run_dir, minutes, args.nproc)


if __name__ == "__main__":
    sys.exit(main())
