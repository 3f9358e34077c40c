"""Text-to-image generation from any Janus checkpoint.

    python -m janus_train.generate --ckpt DIR --prompt TEXT [--cfg 5.0] [--temperature 1.0]
                                   [--top-k K] [--greedy] [--num N] [--seed S] --out DIR
                                   [--device cpu|cuda] [--dtype fp32|bf16|fp16]

Writes N PNGs (prompt slug + index) and a grid.png into --out, and prints their paths.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from PIL import Image

from janus_train.inference.t2i import SampleConfig, codes_to_images, generate_codes, image_grid
from janus_train.checkpoint.io import CheckpointError, load_pretrained, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m janus_train.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (hf, deepseek or native; auto-detected)")
    p.add_argument("--prompt", required=True, help="the caption to draw")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance weight w in u + w(c-u) (default 5)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely codes (default: all)")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--num", type=int, default=4, help="images to generate (default 4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", required=True, help="output directory for PNGs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model dtype (default fp32)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num < 1:
        print(f"error: --num must be >= 1, got {args.num}", file=sys.stderr)
        return 2
    try:
        model = load_pretrained(args.ckpt, device=args.device, dtype=DTYPES[args.dtype])
        tok = load_tokenizer(args.ckpt)
        sc = SampleConfig(args.cfg, args.temperature, args.top_k, args.greedy).validate()
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    codes = generate_codes(model, tok, args.prompt, args.num, sc, generator=gen, progress=True)
    images = codes_to_images(model, codes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", args.prompt).strip("_")[:48] or "image"
    for i, img in enumerate(images):
        path = out / f"{slug}_{i:02d}.png"
        Image.fromarray(img).save(path)
        print(path)
    Image.fromarray(image_grid(images)).save(out / "grid.png")
    print(out / "grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
