"""Pre-tokenisation throughput: images/s of one `pretokenize_vq` process.

    python bench/pretokenize_throughput.py [--work DIR] [--images N] [--image-size PX]
        [--ckpt DIR] [--in DIR] [--device cpu|cuda] [--batch-size B] [--workers K ...]

Without --ckpt/--in it builds (once, cached in --work) a tiny random checkpoint
(`make_tiny_checkpoint`, gen images 64 px) and a gen dataset of N shapes-world JPEGs at
--image-size, and encodes it; with them it encodes your dataset with your checkpoint (on a GPU
node: `--ckpt /ckpt/Janus-Pro-7B --in /data/gen_sample --device cuda --batch-size 64`). Each
--workers value is one fresh run into a new output directory; the figure is images / seconds of
the encoding loop (model load and the dataset-level finalisation excluded: they happen once per
process, not per image). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any


def build_inputs(work: Path, images: int, image_size: int) -> tuple[Path, Path]:
    from data_pipelines import build_shards, synthetic_shapes
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    ckpt, gen = work / "ckpt", work / f"gen_{images}_{image_size}"
    if not (ckpt / "config.json").is_file():
        make_tiny_checkpoint(ckpt, fmt="hf", seed=0)
    if not (gen / "build_report.json").is_file():
        raw = work / f"raw_{images}_{image_size}"
        # synthetic_shapes splits --n gen samples into real and synthetic halves
        synthetic_shapes.main(["--out", str(raw), "--n", str(images * 2), "--image-size", str(image_size), "--seed", "0",
                               "--workers", "1"])
        build_shards.build("gen", raw / "gen_real.jsonl", gen, 256, source="real", progress=False)
    return ckpt, gen


def measure(ckpt: Path, gen: Path, out: Path, device: str, batch_size: int, workers: int) -> dict[str, Any]:
    from data_pipelines.pretokenize_vq import pretokenize

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    s = pretokenize(ckpt, gen, out, batch_size=batch_size, device=device, progress=False, workers=workers)
    wall = time.perf_counter() - t0
    p = s["process"]
    return {"workers": workers, "images": p["rows"], "encode_seconds": p["seconds"], "images_per_s": p["images_per_s"],
            "wall_seconds_with_load_and_finalise": round(wall, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_out/pretokenize", help="cache for the tiny inputs and the outputs")
    ap.add_argument("--images", type=int, default=512, help="gen images to build (without --in)")
    ap.add_argument("--image-size", type=int, default=384, help="side of the built images, before the gen crop")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--in", dest="in_dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    if (args.ckpt is None) != (args.in_dir is None):
        ap.error("--ckpt and --in go together")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.ckpt:
        ckpt, gen = Path(args.ckpt), Path(args.in_dir)
    else:
        ckpt, gen = build_inputs(work, args.images, args.image_size)
    runs = [measure(ckpt, gen, work / f"out_w{w}", args.device, args.batch_size, w) for w in args.workers]
    print(json.dumps({
        "bench": "pretokenize_throughput", "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs visible", "device": args.device,
        "ckpt": str(ckpt), "input": str(gen), "batch_size": args.batch_size,
        "torch_threads": int(__import__("torch").get_num_threads()), "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
