"""Ask a Janus checkpoint (Janus-Pro or JanusFlow) about an image.

    python -m janus_train.chat --ckpt DIR --image FILE --question TEXT [--max-new-tokens N]
                               [--temperature T] [--no-system-prompt] [--device D] [--dtype fp32|bf16|fp16]

Greedy decoding by default (temperature 0); prints the answer.
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image, UnidentifiedImageError

from janus_train.contracts.conversation import DEFAULT_SYSTEM_PROMPT
from janus_train.inference.understand import answer
from janus_train.checkpoint.io import CheckpointError, load_pretrained, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m janus_train.chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (hf, deepseek or native; auto-detected)")
    p.add_argument("--image", required=True, help="image file to ask about")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    p.add_argument("--no-system-prompt", action="store_true", help="omit DeepSeek's default system prompt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model dtype (default fp32)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        print(f"error: cannot read image {args.image}: {e}", file=sys.stderr)
        return 2
    try:
        model = load_pretrained(args.ckpt, device=args.device, dtype=DTYPES[args.dtype])
        tok = load_tokenizer(args.ckpt)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    system = None if args.no_system_prompt else DEFAULT_SYSTEM_PROMPT
    text, _ = answer(model, tok, image, args.question, args.max_new_tokens, system, args.temperature, gen)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
