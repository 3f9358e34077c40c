"""Per-rank start-up memory of a ZeRO-3 run on 1, 2 and 4 ranks (CPU, fake devices).

    python bench/startup_memory.py --preset janus_pro_1b --ranks 1 2 4 [--stage 1] [--work DIR]
    python bench/startup_memory.py --preset small --ranks 1 2

Each measurement is one real run of launch/train.py under the deepspeed launcher: the recipe
tiny_demo with `model=<preset>`, initialised from a random checkpoint of that preset (written
once under --work, native safetensors), ZeRO-3, fp32, one optimizer step of text rows at a
short sequence length. The trainer records, max over ranks (status.json `startup_memory`):
the resident memory before the model is built (`baseline_gib`), the peak with the weights
loaded (`weights_gib`), and the peak with DeepSpeed's engine built (`engine_gib`: + the fp32
masters and AdamW's moments of the trainable parameters). Then the bench sends SIGTERM, as a
scheduler would: the first step finishes, a sharded save follows and the run exits. The largest
resident set of any of its processes over all of that is `first_step_gib` (the kernel's
accounting of the launcher's children). Start-up figures above the baseline are what the run
added; the goal (issue 15) is weights_gib - baseline_gib <= whole fp32 model / ranks + 2 GiB.

Prints one JSON object: per rank count, the four figures, the whole fp32 model size and the
goal. Resident memory counts the pages of the memory-mapped checkpoint a rank touched: under
ZeRO-3 a rank touches only its slices.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import signal
import tempfile
import time
from typing import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Runs one command and prints the largest peak RSS (KiB) of any process it waited for: the
# kernel's ru_maxrss of RUSAGE_CHILDREN is the maximum over reaped descendants, the ranks included.
_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def prepare(work: Path, preset: str) -> tuple[Path, Path]:
    """(init checkpoint, data root) under work, built once."""
    from janus_train.tools.demo_assets import build_shapes_dataset
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    init, data = work / f"{preset}_init", work / "data"
    if not (init / "config.json").is_file():
        print(f"writing a random {preset} checkpoint to {init}", file=sys.stderr, flush=True)
        make_tiny_checkpoint(init, fmt="native", seed=0, preset=preset)
    if not (data / "text").is_dir():
        build_shapes_dataset(data, None, num_samples=64, image_size=64, seed=0, workers=1)
    return init, data


def whole_fp32_gib(preset: str) -> float:
    import torch

    from janus_train.models.families import family_of_preset

    family = family_of_preset(preset)
    with torch.device("meta"):
        model = family.build(family.config(preset))
    return sum(p.numel() for p in model.parameters()) * 4 / 2**30


def run_overrides(preset: str, ranks: int, stage: int, init: Path, data: Path, seq_len: int, run_dir: Path, steps: int = 1) -> list[str]:
    """launch/train.py overrides of a short ZeRO-3 fp32 run of text rows (also bench/checkpoint_save.py's)."""
    name = f"stage{stage}"
    return [
        "+recipe=tiny_demo", f"model={preset}", f"model.init_from={init}", f"data.root={data}", f"data.tokenizer={init}",
        f"run_dir={run_dir}", f"stage={stage}", f"data.seq_len={seq_len}", "data.num_workers=0",
        "data.text=[{path: " + str(data / "text") + "}]", "data.und=[]", "data.gen=[]",
        *[f"train.stages.stage{i}.enabled={str(i == stage).lower()}" for i in (1, 2, 3)],
        f"train.stages.{name}.steps={steps}", f"train.stages.{name}.ratio=0:1:0", f"train.stages.{name}.global_batch={4 * ranks}",
        "train.micro_batch_rows=1", "parallel.zero_stage=3", "parallel.dtype=fp32", "checkpoint.every_steps=1",
        "checkpoint.export_hf=false", "eval.data=null", "demo_assets.build=false", "logging.progress=false",
        "logging.wandb.enabled=false", "logging.sample_every=0",
    ]


def launch(ranks: int, overrides: list[str], stop_when: Callable[[], bool] | None = None, sig: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    """launch/train.py under the deepspeed launcher, wrapped to report the largest peak RSS of
    its processes. `stop_when`: polled; once true, `sig` goes to every rank: SIGTERM saves
    sharded state after the step in progress and exits, as on preemption; SIGKILL ends the run
    there (a failed run is then expected)."""
    port = 20000 + (os.getpid() + ranks) % 10000
    cmd = [sys.executable, "-c", _MEASURE, str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
           "--master_port", str(port), str(ROOT / "launch" / "train.py"), *overrides]
    # glibc serves allocations above 64 KiB with mmap, so a freed tensor leaves the resident set
    # at once and the peaks track live tensors, not heap fragmentation (as bench/peak_memory.py).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline", MALLOC_MMAP_THRESHOLD_="65536")
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True)
        while stop_when is not None and proc.poll() is None:
            if stop_when():
                for pid in _ranks_of(proc.pid):
                    os.kill(pid, sig)
                break
            time.sleep(0.5)
        proc.wait()
        out.seek(0)
        log = out.read()
    if proc.returncode != 0 and sig != signal.SIGKILL:
        raise RuntimeError(f"{ranks} ranks: the run failed ({proc.returncode}):\n{log[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, log, "")


def _ranks_of(pgid: int) -> list[int]:
    """The training ranks in process group `pgid` (signalled directly: DeepSpeed's launcher
    would answer a SIGTERM by killing them, and its reaped children are what the wrapper
    measures)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid and any(a.startswith(b"--local_rank") for a in cmd):
            pids.append(int(d.name))
    return pids


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def measure(preset: str, ranks: int, stage: int, init: Path, data: Path, seq_len: int, run_dir: Path, step: bool = True) -> dict:
    """Start-up, then SIGTERM: the first step runs, a sharded (preemption) save follows, and the
    run exits; a stage end would gather the whole weights to rank 0, which is not start-up.
    `step=False`: SIGKILL once the start-up figures are in, no step (`first_step_gib` None)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    r = launch(ranks, run_overrides(preset, ranks, stage, init, data, seq_len, run_dir, steps=1000),
               stop_when=lambda: bool(_status(run_dir).get("startup_memory")), sig=signal.SIGTERM if step else signal.SIGKILL)
    maxrss = next(int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("MAXRSS_KIB"))
    status = _status(run_dir)
    if not step:
        return {**status["startup_memory"], "first_step_gib": None,
                "weights_above_baseline_gib": round(status["startup_memory"]["weights_gib"] - status["startup_memory"]["baseline_gib"], 3)}
    if status.get("state") != "preempted":
        raise RuntimeError(f"{ranks} ranks: expected the run to stop on SIGTERM, status {status}")
    mem = status["startup_memory"]
    return {**mem, "first_step_gib": round(maxrss / 2**20, 3), "weights_above_baseline_gib": round(mem["weights_gib"] - mem["baseline_gib"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to measure (default 1 2)")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2, 3], help="training stage: what trains (default 2)")
    p.add_argument("--seq-len", type=int, default=64, help="packed row length (default 64)")
    p.add_argument("--work", default=None, help="directory for the checkpoint, data and runs (default: a temporary one)")
    p.add_argument("--step-ranks", type=int, nargs="*", default=None,
                   help="rank counts that also run the first step (default: all); the others stop after start-up "
                        "(DeepSpeed's ZeRO-3 buffers of the first step are sized for GPUs and may not fit a small host)")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.ranks):
        p.error(f"--ranks must be >= 1, got {args.ranks}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="janus-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    init, data = prepare(work, args.preset)
    whole = whole_fp32_gib(args.preset)
    out = {"preset": args.preset, "stage": args.stage, "zero_stage": 3, "dtype": "fp32", "seq_len": args.seq_len,
           "whole_fp32_model_gib": round(whole, 3), "runs": {}}
    for n in args.ranks:
        step = args.step_ranks is None or n in args.step_ranks
        res = measure(args.preset, n, args.stage, init, data, args.seq_len, work / f"run_{n}", step=step)
        res["goal_weights_above_baseline_gib"] = round(whole / n + 2, 3)
        out["runs"][str(n)] = res
        print(f"{n} rank(s): {json.dumps(res)}", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
