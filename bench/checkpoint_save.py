"""Time and bytes of a periodic (sharded) save against a whole-weights save, on CPU.

    python bench/checkpoint_save.py --preset janus_pro_1b --ranks 2 [--stage 1] [--work DIR]

One real run of launch/train.py (bench/startup_memory.py's: ZeRO-3, fp32, text rows, short
rows) for two steps with a checkpoint every step: step 1 is a periodic save (DeepSpeed's
partitions, loader, RNG, meta: nothing gathered), step 2 the stage end, which also gathers the
whole fp32 weights to rank 0 and writes them as model/ (what every save did before issue 15).
The trainer logs each save's wall time and the bytes in the checkpoint directory; this prints
them as one JSON object. Whole-weights save minus the sharded one is what moving the gather
out of the preemption window saves.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup_memory import launch, prepare, run_overrides  # noqa: E402

_SAVED = re.compile(r"checkpoint (step_\d+) saved in ([\d.]+) s, ([\d.]+) GiB written \((.+)\)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--ranks", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--stage", type=int, default=1, choices=[1, 2, 3], help="training stage: what trains (default 1)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--work", default=None, help="directory for the checkpoint, data and run (default: a temporary one)")
    args = p.parse_args(argv)
    if args.ranks < 1:
        p.error(f"--ranks must be >= 1, got {args.ranks}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="janus-save-"))
    work.mkdir(parents=True, exist_ok=True)
    init, data = prepare(work, args.preset)
    run_dir = work / "save_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    r = launch(args.ranks, run_overrides(args.preset, args.ranks, args.stage, init, data, args.seq_len, run_dir, steps=2))
    saves = {}
    for m in _SAVED.finditer(r.stdout + r.stderr):
        kind = "sharded" if m.group(4).startswith("sharded") else "whole"
        saves[kind] = {"checkpoint": m.group(1), "seconds": float(m.group(2)), "gib_written": float(m.group(3))}
    if set(saves) != {"sharded", "whole"}:
        raise SystemExit(f"expected one sharded and one whole save in the run's log, found {saves}")
    print(json.dumps({"preset": args.preset, "ranks": args.ranks, "stage": args.stage, "zero_stage": 3, "dtype": "fp32", "saves": saves}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
