"""Stand-in for launch/train.py that honours the training CLI contract, for harness tests.

It is not a trainer: each "step" is one gloo all-reduce and a scalar update, so a step costs
milliseconds plus `FAKE_STEP_SECONDS` of sleep. What it reproduces is everything the cluster
harness relies on:

* `key=value` overrides (`+recipe=...` included); an unknown key exits 2 with
  `config error: <key>: <message>` on stderr before any rank trains; `--check` validates only;
* RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment, and the
  `--local_rank=N` argument that the deepspeed launcher appends;
* status.json {"state": "running"} once the signal handlers are installed;
* SIGUSR1 / SIGTERM: finish the step, agree across ranks, save, write
  status.json {"state": "preempted"}, exit 0; normal end -> "completed";
* checkpoints under run_dir/checkpoints, `resume=auto` picks the newest complete one;
* metrics.jsonl lines with step, stage and the loss keys, appended on resume, and losses that
  depend on the restored state, so a wrong resume shows up as different numbers.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

KNOWN = {
    "recipe": "tiny_demo",
    "run_dir": "runs/fake",
    "resume": "none",
    "seed": "0",
    "stage": "1",
    "train.stages.stage1.steps": "3",
    "train.stages.stage2.steps": "3",
    "train.stages.stage3.steps": "3",
    "checkpoint.every_steps": "2",
    "parallel.zero_stage": "2",
    "parallel.timeout_minutes": "10",
    "parallel.nodes": "1",
    "parallel.gpus_per_node": "8",
    "logging.wandb.enabled": "true",
    "data.root": "data/tiny",
}


def config_error(key: str, message: str) -> None:
    print(f"config error: {key}: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse(argv: list[str]) -> dict[str, str]:
    cfg = dict(KNOWN)
    for arg in argv:
        if arg.startswith("--local_rank"):  # appended by the deepspeed launcher
            continue
        if "=" not in arg:
            config_error(arg, "expected key=value")
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if key not in KNOWN:
            config_error(key, "unknown key")
        cfg[key] = value
    if cfg["recipe"] not in ("tiny_demo", "janus_pro_1b", "janus_pro_7b"):
        config_error("recipe", f"no recipe named {cfg['recipe']!r}")
    for key in ("seed", "stage", "checkpoint.every_steps", "parallel.zero_stage"):
        if not cfg[key].lstrip("-").isdigit():
            config_error(key, f"expected an integer, got {cfg[key]!r}")
    return cfg


def newest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def main() -> None:
    argv = sys.argv[1:]
    cfg = parse([a for a in argv if a != "--check"])
    if "--check" in argv:  # validate only, as launch/train.py --check does
        print("config ok")
        sys.exit(0)
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    run_dir = Path(cfg["run_dir"])
    ckpt_root = run_dir / "checkpoints"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)

    stop = {"requested": False}

    def on_signal(signum, _frame):  # idempotent: a second signal must not abort the save
        stop["requested"] = True

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    timeout = datetime.timedelta(minutes=float(cfg["parallel.timeout_minutes"]))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    print(f"rank {rank}/{world} local_rank {os.environ.get('LOCAL_RANK')} "
          f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)

    steps = [int(cfg[f"train.stages.stage{k}.steps"]) for k in (1, 2, 3)]
    schedule = [(k + 1, s) for k in range(3) for s in range(steps[k]) if k + 1 >= int(cfg["stage"])]
    weight = torch.zeros(4, dtype=torch.float64)
    done = 0
    ckpt = newest_checkpoint(ckpt_root) if cfg["resume"] == "auto" else None
    if ckpt is not None:
        state = torch.load(ckpt / f"rank{rank}.pt", weights_only=True)
        weight, done = state["weight"], int(state["done"])
        print(f"rank {rank}: resumed from {ckpt} at step {done}", flush=True)

    def save(tag: str) -> Path:
        path = ckpt_root / f"step_{done:06d}"
        path.mkdir(parents=True, exist_ok=True)
        if tag == "preempted":  # a real save of a large model takes a while; let tests say how long
            time.sleep(float(os.environ.get("FAKE_PREEMPT_SAVE_SECONDS", "0")))
        torch.save({"weight": weight, "done": done}, path / f"rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            (path / "COMPLETE").write_text(tag)
        dist.barrier()
        return path

    def write_status(state: str) -> None:
        if rank == 0:
            stage, _ = schedule[min(done, len(schedule)) - 1] if done else schedule[0]
            tmp = run_dir / "status.json.tmp"
            tmp.write_text(json.dumps({"state": state, "step": done, "stage": stage,
                                       "world_size": world}))
            tmp.replace(run_dir / "status.json")

    write_status("running")  # like the engine: after the handlers are installed
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.3"))
    seed = int(cfg["seed"])
    while done < len(schedule):
        stage, _ = schedule[done]
        gen = torch.Generator().manual_seed(seed * 100003 + done)
        target = torch.randn(4, generator=gen, dtype=torch.float64) + rank
        grad = weight - target
        dist.all_reduce(grad)
        grad /= world
        loss = float((grad ** 2).sum())
        weight = weight - 0.1 * grad
        done += 1
        time.sleep(step_seconds)
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": done, "stage": stage, "loss": loss, "loss_und": loss / 2,
                                    "loss_text": loss / 3, "loss_gen": loss / 6}) + "\n")
        flag = torch.tensor([1.0 if stop["requested"] else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops after the same step
        if flag.item() > 0:
            path = save("preempted")
            write_status("preempted")
            print(f"rank {rank}: preempted after step {done}, saved {path}", flush=True)
            dist.destroy_process_group()
            return
        if done % int(cfg["checkpoint.every_steps"]) == 0:
            save("periodic")
    save("final")
    write_status("completed")
    print(f"rank {rank}: completed {done} steps", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # like the engine: one line that names the rank and the error
        print(f"rank {os.environ.get('RANK')}: training failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
