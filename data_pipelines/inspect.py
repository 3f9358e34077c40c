"""Stream a data config through the loaders of all ranks and print one JSON line per step.

    python -m data_pipelines.inspect --data-config FILE.yaml --seq-len L --global-batch B
        --dp-size D --steps N [--ratio R | --recipe NAME --stage S] [--ckpt DIR]
        [--num-workers K] [--micro-batch-rows M]

Each line: {"step", "rows": {"und", "text", "gen"}, "gen_sources": {name: documents},
"samples", "tokens", "pad_fraction", "skipped"}, summed over the D ranks of the step:
rows = packed rows per task, samples = documents packed, tokens = non-pad tokens,
pad_fraction = pad tokens / (rows * seq_len), skipped = samples skipped so far, per
"task/source" and reason. The und:text:gen ratio and the global batch come from --ratio /
--global-batch, or from a training recipe's stage (--recipe janus_pro_1b --stage 2), or from
the data config itself. The model geometry (image tokens, codes per image) comes from the
checkpoint --ckpt, which defaults to the config's `tokenizer` directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from janus_train.contracts.batch import TASKS
from janus_train.contracts.errors import ConfigError
from janus_train.data.config import DataConfig, ImageConfig
from janus_train.data.loader import build_train_loader
from janus_train.contracts.tokens import TokenizerInfo


def step_summary(step: int, per_rank: list[list[Any]], seq_len: int, skipped: dict[str, dict[str, int]]) -> dict[str, Any]:
    rows = {t: 0 for t in TASKS}
    gen_sources: dict[str, int] = {}
    samples = tokens = total = 0
    for micro_batches in per_rank:
        for mb in micro_batches:
            for task, srcs in zip(mb.meta["row_tasks"], mb.meta["sources"]):
                rows[task] += 1
                if task == "gen":
                    for s in srcs:
                        gen_sources[s] = gen_sources.get(s, 0) + 1
            samples += mb.meta["num_docs"]
            n = mb.num_rows * mb.seq_len
            total += n
            tokens += n - mb.meta["pad_tokens"]
    return {
        "step": step,
        "rows": rows,
        "gen_sources": dict(sorted(gen_sources.items())),
        "samples": samples,
        "tokens": tokens,
        "pad_fraction": round(1 - tokens / total, 6) if total else 0.0,
        "skipped": skipped,
    }


def _merge(stats: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for st in stats:
        for src, reasons in st.items():
            d = out.setdefault(src, {})
            for r, n in reasons.items():
                d[r] = d.get(r, 0) + n
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-config", required=True, help="data config YAML")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ratio", default=None, help="und:text:gen rows per step, e.g. 2:3:5 (default: the data config's)")
    p.add_argument("--recipe", default=None, help="take ratio and global batch from this training recipe's --stage")
    p.add_argument("--stage", type=int, default=None, choices=(1, 2, 3), help="the --recipe stage (default 1)")
    p.add_argument("--micro-batch-rows", type=int, default=None)
    p.add_argument("--ckpt", default=None, help="checkpoint for tokenizer and image geometry (default: the config's tokenizer)")
    p.add_argument("--num-workers", type=int, default=0, help="decode processes per rank (default 0: in process)")
    args = p.parse_args(argv)

    overrides: dict[str, Any] = {"num_workers": args.num_workers}
    if args.seq_len is not None:
        overrides["seq_len"] = args.seq_len
    if args.micro_batch_rows is not None:
        overrides["micro_batch_rows"] = args.micro_batch_rows
    if args.recipe is not None:
        from janus_train.training.config import load_config

        try:
            stage = load_config([f"+recipe={args.recipe}"]).train.stages[f"stage{args.stage or 1}"]
        except ConfigError as e:
            p.error(str(e))
        overrides["ratio"], overrides["global_batch"] = stage.ratio, stage.global_batch
    elif args.stage is not None:
        p.error("--stage needs --recipe (the stage's ratio and batch are the recipe's)")
    if args.ratio is not None:
        overrides["ratio"] = args.ratio
    if args.global_batch is not None:
        overrides["global_batch"] = args.global_batch
    overrides["dp_size"], overrides["dp_rank"] = args.dp_size, 0
    try:
        cfg = DataConfig.from_yaml(args.data_config, overrides)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    ckpt = args.ckpt or cfg.tokenizer
    if not ckpt:
        p.error("no --ckpt given and the data config sets no `tokenizer`")
    from janus_train.checkpoint.io import read_config

    image = ImageConfig.from_model(read_config(ckpt))
    tok = TokenizerInfo.from_hf(ckpt)
    loaders = [build_train_loader(cfg, tok, image, r, args.dp_size) for r in range(args.dp_size)]
    try:
        for step in range(args.steps):
            per_rank = [next(ld) for ld in loaders]
            skipped = _merge([ld.stats()["skipped"] for ld in loaders])
            print(json.dumps(step_summary(step, per_rank, cfg.seq_len, skipped)), flush=True)
    finally:
        for ld in loaders:
            ld.close()


if __name__ == "__main__":
    sys.exit(main())
