"""Encode the images of a gen dataset to VQ codes with the checkpoint's frozen VQ model (Janus-Pro).

    python -m data_pipelines.pretokenize_vq --ckpt DIR --in DIR --out DIR
        [--batch-size B] [--device cpu|cuda] [--keep-image] [--workers N]
        [--rank R --world-size W] [--finalize-only]

Each sample becomes `json`, `codes.npy` (uint16, or int32 for codebooks over 65536) and
`prompt_ids.npy`; the image is dropped unless --keep-image. Resumable per shard; bad samples are
skipped and counted in OUT/build_report.json (data_pipelines/pretokenize.py has the details).

Distributed: started by torchrun (`torchrun --nproc_per_node 8 -m data_pipelines.pretokenize_vq
...`), as a Slurm array (launch/slurm/pretokenize.sbatch) or with --rank/--world-size, each
process encodes every world-size-th shard; the last one to finish writes the dataset files
(or `--finalize-only` does). With torchrun each process uses GPU LOCAL_RANK.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from data_pipelines.pretokenize import (ImageEncoder, add_distributed_args, default_workers, local_device, report_result, run,
                                        vq_encoder, vq_meta)


def pretokenize(ckpt: str | Path, in_dir: str | Path, out_dir: str | Path, batch_size: int = 64, device: str = "cpu",
                keep_image: bool = False, progress: bool = True, *, rank: int | None = None, world_size: int | None = None,
                workers: int = 0, finalize_only: bool = False) -> dict[str, Any]:
    from janus_train.checkpoint.io import load_pretrained, read_config

    cfg = read_config(str(ckpt))
    if getattr(cfg, "vq", None) is None:
        raise ValueError(f"{ckpt} has no VQ model (a JanusFlow checkpoint takes data_pipelines.pretokenize_vae)")

    def load() -> Any:
        # Only a process with shards to encode reads the weights.
        model = load_pretrained(str(ckpt)).to(device).eval()
        return vq_encoder(model, device).encode

    encoder = ImageEncoder("vq", int(cfg.gen_image_size), None, vq_meta(cfg), load)
    return run(encoder, ckpt, in_dir, out_dir, batch_size, keep_image, progress, rank=rank, world_size=world_size,
               workers=workers, finalize_only=finalize_only)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (its VQ model and tokenizer are used)")
    p.add_argument("--in", dest="in_dir", required=True, help="gen dataset with images (from build_shards)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep-image", action="store_true", help="also keep the image in the output samples")
    add_distributed_args(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    workers = default_workers() if args.workers is None else args.workers
    try:
        s = pretokenize(args.ckpt, args.in_dir, args.out, args.batch_size, local_device(args.device), args.keep_image,
                        rank=args.rank, world_size=args.world_size, workers=workers, finalize_only=args.finalize_only)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    report_result(s, args.out)


if __name__ == "__main__":
    main()
