"""The tiny demo's inputs, built on the fly when absent: a random tiny init checkpoint and the
synthetic shapes dataset (und, text, gen real + synthetic with pre-extracted VQ codes).

Rank 0 builds; the others wait at a barrier. A `.complete` marker is written last, so an
interrupted build is redone rather than trusted.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from janus_train.parallel.distributed import DistInfo, barrier


def build_shapes_dataset(root: Path, ckpt: Path, num_samples: int, image_size: int, seed: int, workers: int = 2) -> None:
    from data_pipelines import build_shards, pretokenize_vq, synthetic_shapes

    raw = root / "raw"
    synthetic_shapes.main(["--out", str(raw), "--n", str(num_samples), "--image-size", str(image_size), "--seed", str(seed), "--workers", str(workers)])
    shard = max(64, num_samples // 8)
    build_shards.build("und", raw / "und.jsonl", root / "und", shard_size=shard, workers=workers)
    build_shards.build("text", raw / "text.jsonl", root / "text", shard_size=shard, workers=workers)
    for kind in ("real", "synthetic"):
        images = root / f"gen_{kind}_images"
        build_shards.build("gen", raw / f"gen_{kind}.jsonl", images, shard_size=shard, workers=workers, source=kind)
        pretokenize_vq.pretokenize(ckpt, images, root / f"gen_{kind}")
        shutil.rmtree(images)
    shutil.rmtree(raw)


def build_demo_assets(root: Path, init: Path, preset: str, num_samples: int, seed: int) -> None:
    """Build whatever is missing (idempotent; a `.complete` marker is written last)."""
    if not (init / "config.json").is_file():
        from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

        print(f"building the tiny init checkpoint at {init}", flush=True)
        make_tiny_checkpoint(init, fmt="hf", seed=seed, preset=preset)
    if not (root / ".complete").is_file():
        for sub in ("raw", "und", "text", "gen_real", "gen_synthetic", "gen_real_images", "gen_synthetic_images"):
            shutil.rmtree(root / sub, ignore_errors=True)  # leftovers of an interrupted build
        root.mkdir(parents=True, exist_ok=True)
        print(f"building the synthetic shapes dataset at {root}", flush=True)
        from janus_train.checkpoint.io import read_config

        image_size = int(read_config(init).vision.image_size * 3 // 2)  # larger than the model sees: resizing is exercised
        build_shapes_dataset(root, init, num_samples, image_size, seed)
        (root / ".complete").write_text("ok\n")


def ensure_demo_assets(cfg: DictConfig, dist_info: DistInfo) -> None:
    """Rank 0 builds the demo inputs in a fresh subprocess; the others wait at a barrier.

    A subprocess, because the builders use fork-based worker pools, and forking a rank that
    already runs gloo/DeepSpeed threads can deadlock the child.
    """
    root = Path(cfg.data.root)
    init = Path(cfg.model.init_from)
    if dist_info.is_main and not ((init / "config.json").is_file() and (root / ".complete").is_file()):
        cmd = [
            sys.executable, "-m", "janus_train.tools.demo_assets",
            "--root", str(root), "--init", str(init), "--preset", str(cfg.model.preset),
            "--num-samples", str(int(cfg.demo_assets.num_samples)), "--seed", str(int(cfg.seed)),
        ]
        subprocess.run(cmd, check=True)
    barrier()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset directory (data.root)")
    p.add_argument("--init", required=True, help="tiny init checkpoint directory (model.init_from)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--num-samples", type=int, default=1500, help="samples per task")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    build_demo_assets(Path(a.root), Path(a.init), a.preset, a.num_samples, a.seed)


if __name__ == "__main__":
    main()
