"""The tiny demo's inputs, built on the fly when absent: a random tiny init checkpoint and the
synthetic shapes dataset (und, text, gen real + synthetic with pre-extracted VQ codes).

Rank 0 builds; the others wait at a barrier. A `.complete` marker is written last, so an
interrupted build is redone rather than trusted.
"""

from __future__ import annotations

import shutil
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


def ensure_demo_assets(cfg: DictConfig, dist_info: DistInfo) -> None:
    root = Path(cfg.data.root)
    init = Path(cfg.model.init_from)
    if dist_info.is_main:
        if not (init / "config.json").is_file():
            from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

            print(f"building the tiny init checkpoint at {init}", flush=True)
            make_tiny_checkpoint(init, fmt="hf", seed=int(cfg.seed), preset=cfg.model.preset)
        if not (root / ".complete").is_file():
            for sub in ("raw", "und", "text", "gen_real", "gen_synthetic", "gen_real_images", "gen_synthetic_images"):
                shutil.rmtree(root / sub, ignore_errors=True)  # leftovers of an interrupted build
            root.mkdir(parents=True, exist_ok=True)
            print(f"building the synthetic shapes dataset at {root}", flush=True)
            from janus_train.models.janus.loading import read_config

            image_size = int(read_config(init).vision.image_size * 3 // 2)  # larger than the model sees: resizing is exercised
            build_shapes_dataset(root, init, int(cfg.demo_assets.num_samples), image_size, int(cfg.seed))
            (root / ".complete").write_text("ok\n")
    barrier()
