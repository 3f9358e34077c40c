"""Encode the images of a gen dataset to VQ codes with the checkpoint's frozen VQ model (Janus-Pro).

    python -m data_pipelines.pretokenize_vq --ckpt DIR --in DIR --out DIR
        [--batch-size B] [--device cpu|cuda] [--keep-image]

Each sample becomes `json`, `codes.npy` (uint16, or int32 for codebooks over 65536) and
`prompt_ids.npy`; the image is dropped unless --keep-image. Resumable per shard; bad samples are
skipped and counted in OUT/build_report.json (data_pipelines/pretokenize.py has the details).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from data_pipelines.pretokenize import run, vq_encoder


def pretokenize(ckpt: str | Path, in_dir: str | Path, out_dir: str | Path, batch_size: int = 64, device: str = "cpu",
                keep_image: bool = False, progress: bool = True) -> dict[str, Any]:
    from janus_train.checkpoint.io import load_pretrained

    model = load_pretrained(str(ckpt)).to(device).eval()
    return run(vq_encoder(model, device), ckpt, in_dir, out_dir, batch_size, keep_image, progress)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (its VQ model and tokenizer are used)")
    p.add_argument("--in", dest="in_dir", required=True, help="gen dataset with images (from build_shards)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep-image", action="store_true", help="also keep the image in the output samples")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    s = pretokenize(args.ckpt, args.in_dir, args.out, args.batch_size, args.device, args.keep_image)
    print(f"encoded {s['written']} of {s['rows']} samples to {args.out}; skipped {s['skipped'] or 0}")


if __name__ == "__main__":
    main()
