"""CPU packed-attention timing: SDPA with the block-diagonal mask vs one causal call per document.

    python bench/attention.py [--model small] [--seq-len L] [--docs N] [--repeats R]

Times one layer's attention forward + backward on the train-step benchmark's packed rows
(same documents as bench/train_step.py), in process CPU time with one thread, and checks the
two paths agree. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from janus_train.contracts.synthetic import DocMix, fill_rows  # noqa: E402
from bench.train_step import DEFAULTS  # noqa: E402
from janus_train.models import attention  # noqa: E402
from janus_train.models.janus.config import JanusConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(DEFAULTS))
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seq_len, rows = DEFAULTS[args.model]
    seq_len, rows = args.seq_len or seq_len, args.rows or rows
    cfg = JanusConfig.from_preset(args.model)
    batch, _ = fill_rows(cfg, rows, seq_len, mix=DocMix.janus_pro(seq_len / 4096))
    docs = attention.PackedDocs.from_cu_seqlens(batch.cu_seqlens, batch.max_seqlen, batch.num_rows, seq_len)
    heads, head_dim = cfg.llm.num_heads, cfg.llm.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch.num_rows, heads, seq_len, head_dim, generator=g).requires_grad_() for _ in range(3))
    paths = {
        "masked": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=docs.dense_mask()),
        "by_document": lambda: attention._sdpa_by_document(q, k, v, docs),
    }
    times = {}
    for name, fn in paths.items():
        fn().sum().backward()
        ts = []
        for _ in range(args.repeats):
            t = time.process_time()
            fn().sum().backward()
            ts.append(time.process_time() - t)
        times[name] = statistics.median(ts)
    with torch.no_grad():
        diff = float((paths["masked"]() - paths["by_document"]()).abs().max())
    print(json.dumps({
        "model": args.model, "rows": batch.num_rows, "seq_len": seq_len, "documents": len(docs.row_segments()),
        "masked_s": round(times["masked"], 5), "by_document_s": round(times["by_document"], 5),
        "speedup": round(times["masked"] / times["by_document"], 2), "max_abs_diff": diff,
        "auto_choice": "by_document" if attention._by_document_pays(docs, heads * head_dim) else "masked",
        "clock": "process CPU time, 1 thread, one layer forward+backward",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
