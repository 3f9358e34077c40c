#!/usr/bin/env python
"""janus-train entry point.

    deepspeed [--num_gpus N | --hostfile H] launch/train.py +recipe=NAME [key=value ...]
    torchrun --nproc-per-node N launch/train.py +recipe=NAME [key=value ...]
    python launch/train.py +recipe=NAME [key=value ...]                 (one process)
    python launch/train.py +recipe=NAME [key=value ...] --cfg job       (print the resolved config)
    python launch/train.py +recipe=NAME [key=value ...] --check         (validate only: exit 0 or 2)

Overrides are Hydra syntax (see recipes/config.yaml for every key). Exit codes: 0 completed
or stopped cleanly by SIGTERM/SIGUSR1 after saving (see run_dir/status.json), 1 failed,
2 config error (printed as "config error: <key>: <message>"), 3 aborted (non-finite losses).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def split_args(argv: list[str]) -> tuple[list[str], str | None]:
    """Drop the launcher's --local_rank (LOCAL_RANK is in the environment anyway), pull out
    --cfg (and --check, returned as show="check")."""
    overrides, show = [], None
    it = iter(argv)
    for arg in it:
        if re.fullmatch(r"--local[_-]rank(=\d+)?", arg):
            if "=" not in arg:
                next(it, None)
            continue
        if arg == "--cfg":
            show = next(it, "job")
            continue
        if arg.startswith("--cfg="):
            show = arg.split("=", 1)[1]
            continue
        if arg == "--check":
            show = "check"
            continue
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        overrides.append(arg)
    return overrides, show


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code not in (0, None):
        # The Slurm script reports the first failing rank's code from this line.
        print(f"janus-train: rank {os.environ.get('RANK', '0')} exits with code {code}", file=sys.stderr, flush=True)
    return code


def _main(argv: list[str] | None) -> int:
    # First thing: remember SIGTERM/SIGUSR1 instead of dying during imports and setup.
    from janus_train.training.signals import StopFlag

    StopFlag.install()
    overrides, show = split_args(sys.argv[1:] if argv is None else argv)
    from janus_train.training.config import ConfigError, load_config, resolved_yaml

    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(overrides)
    except ConfigError as e:
        if rank == 0:
            print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    if show == "check":
        # What the ranks would check before starting, with this world size (Slurm's batch
        # script runs it once on the batch host before `srun`).
        from janus_train.training.config import validate_config

        world = int(os.environ.get("WORLD_SIZE", "1"))
        demo = cfg.get("demo_assets", {}).get("build") is True
        try:
            run_cfg = validate_config(cfg, check_paths=not demo)
            if world % run_cfg.parallel.tp:
                raise ConfigError("parallel.tp", f"{run_cfg.parallel.tp} must divide the world size {world}")
            validate_config(cfg, dp_size=world // run_cfg.parallel.tp, check_paths=not demo)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr, flush=True)
            return 2
        print(f"config ok ({world} ranks)")
        return 0
    if show is not None:
        if show not in ("job", "all"):
            print(f"config error: --cfg: must be job or all, got {show!r}", file=sys.stderr)
            return 2
        if rank == 0:
            print(resolved_yaml(cfg), end="")
        return 0
    from janus_train.training.trainer import run

    prepare = None
    if cfg.get("demo_assets", {}).get("build") is True:
        # The demo recipe's inputs (a tiny init checkpoint, the shapes dataset) are built on
        # the fly when absent; the trainer itself never builds data.
        from janus_train.tools.demo_assets import ensure_demo_assets

        prepare = ensure_demo_assets
    return run(cfg, prepare)


if __name__ == "__main__":
    sys.exit(main())
