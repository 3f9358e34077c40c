"""Synthetic Janus documents and packed batches (no tokenizer, no images on disk).

The documents have the shape of real ones, with random ids:
  und   BOS, prompt, <image_placeholder> x num_image_tokens, question, answer; loss on the answer
  text  plain tokens; loss on every next token
  gen   BOS, caption, then num_image_tokens VQ codes; loss on the codes (predicted from the
        position before each code)
  gen (JanusFlow config) BOS, caption, the time slot, num_gen_tokens latent slots; no CE
        targets; a random latent draw (x1, z0, t) and, when REPA is on, a random uint8 image
The model-dependent sizes come from a model config (`num_image_tokens`, `llm.vocab_size`,
`vq.codebook_size`, `vision.image_size`, `image_token_id`; for JanusFlow `num_gen_tokens`,
`latent_size`, `flow`). Used by the parallelism tests, the train-step benchmark and the
memory-plan cross-check, so all of them exercise the same mixed und/text/gen rows, built by the
loader's own `collate`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from janus_train.contracts.batch import TASK_ID, Doc, PackedBatch, Row, collate

PAD_ID = 0
BOS_ID = 1
# Random text ids avoid these reserved ids; the image placeholder is the last vocabulary id.
FIRST_TEXT_ID = 4


def image_token_id(cfg: Any) -> int:
    tid = getattr(cfg, "image_token_id", None)  # JanusFlow's config has none
    return tid if tid is not None else cfg.llm.vocab_size - 1


def is_flow(cfg: Any) -> bool:
    """A JanusFlow model config (rectified-flow generation) rather than Janus-Pro's."""
    return hasattr(cfg, "flow")


def _ids(rng: random.Random, n: int, cfg: Any) -> list[int]:
    hi = min(cfg.llm.vocab_size, image_token_id(cfg)) - 1
    return [rng.randint(FIRST_TEXT_ID, hi) for _ in range(n)]


def _doc(key: str, task: str, ids: list[int], first_target: int, gen_start: int | None = None, pixels=None) -> Doc:
    """ids[first_target:] are loss targets (each predicted from the position before it)."""
    arr = np.asarray(ids, dtype=np.int32)
    target = np.zeros(len(ids), dtype=bool)
    target[first_target:] = True
    return Doc(key=key, task=TASK_ID[task], ids=arr, target=target, gen_start=len(ids) if gen_start is None else gen_start, pixels=pixels)


def text_doc(rng: random.Random, cfg: Any, n: int, key: str = "text") -> Doc:
    return _doc(key, "text", [BOS_ID] + _ids(rng, n - 1, cfg), first_target=1)


def und_doc(rng: random.Random, cfg: Any, prompt_len: int, answer_len: int, key: str = "und") -> Doc:
    n_img = cfg.num_image_tokens
    img = image_token_id(cfg)
    q = max(prompt_len - 1, 2)
    prompt = [BOS_ID] + _ids(rng, q // 2, cfg) + [img] * n_img + _ids(rng, q - q // 2, cfg)
    answer = _ids(rng, answer_len, cfg)
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    size = cfg.vision.image_size
    image = torch.rand(1, 3, size, size, generator=g) * 2 - 1  # already normalised
    return _doc(key, "und", prompt + answer, first_target=len(prompt), pixels=image)


def gen_doc(rng: random.Random, cfg: Any, caption_len: int, key: str = "gen") -> Doc:
    if is_flow(cfg):
        return flow_gen_doc(rng, cfg, caption_len, key)
    prompt = [BOS_ID] + _ids(rng, caption_len, cfg)
    codes = [rng.randrange(cfg.vq.codebook_size) for _ in range(cfg.num_image_tokens)]
    return _doc(key, "gen", prompt + codes, first_target=len(prompt), gen_start=len(prompt))


def flow_gen_doc(rng: random.Random, cfg: Any, caption_len: int, key: str = "gen") -> Doc:
    """A JanusFlow gen document with its latent draw (x1, z0, t) and, when REPA is on, its image."""
    prompt = [BOS_ID] + _ids(rng, caption_len, cfg)
    ids = prompt + [BOS_ID] + [image_token_id(cfg)] * cfg.num_gen_tokens  # time slot, latent slots
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    shape = (cfg.flow.latent_channels, cfg.latent_size, cfg.latent_size)
    draw = (torch.randn(shape, generator=g).numpy(), torch.randn(shape, generator=g).numpy(), float(torch.rand((), generator=g)))
    side = cfg.image_size
    pixels = torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8, generator=g).numpy() if cfg.flow.repa_weight > 0 else None
    doc = _doc(key, "gen", ids, first_target=len(ids), gen_start=len(prompt), pixels=pixels)
    doc.flow = draw
    return doc


@dataclass
class DocMix:
    """Document-length ranges (uniform, in tokens besides the image tokens) and the
    und:text:gen document ratio."""

    ratio: tuple[int, int, int] = (2, 3, 5)  # Janus-Pro stage 2
    und_prompt: tuple[int, int] = (8, 32)
    und_answer: tuple[int, int] = (8, 64)
    text_len: tuple[int, int] = (32, 256)
    gen_caption: tuple[int, int] = (8, 48)

    @classmethod
    def janus_pro(cls, scale: float = 1.0) -> "DocMix":
        """Lengths of bench/data_throughput.py's Janus-Pro-sized data at seq_len 4096 (system
        prompt + question ~40-70 tokens, answers 10-1500, captions 10-150, text 10-1500),
        multiplied by `scale` (seq_len / 4096 for smaller models)."""

        def r(lo: int, hi: int) -> tuple[int, int]:
            return max(2, round(lo * scale)), max(3, round(hi * scale))

        return cls(und_prompt=r(40, 70), und_answer=r(10, 1500), text_len=r(10, 1500), gen_caption=r(10, 150))


def make_documents(cfg: Any, num_docs: int, seed: int = 0, mix: DocMix | None = None, max_len: int | None = None) -> list[Doc]:
    """`num_docs` documents cycling und/text/gen in `mix.ratio`, lengths capped at max_len."""
    mix = mix or DocMix()
    rng = random.Random(seed)
    pattern = ["und"] * mix.ratio[0] + ["text"] * mix.ratio[1] + ["gen"] * mix.ratio[2]
    docs: list[Doc] = []
    for i in range(num_docs):
        kind = pattern[i % len(pattern)]
        if kind == "und":
            d = und_doc(rng, cfg, rng.randint(*mix.und_prompt), rng.randint(*mix.und_answer), key=f"und{i}")
        elif kind == "text":
            n = rng.randint(*mix.text_len)
            d = text_doc(rng, cfg, min(n, max_len) if max_len else n, key=f"text{i}")
        else:
            d = gen_doc(rng, cfg, rng.randint(*mix.gen_caption), key=f"gen{i}")
        if max_len is not None and len(d) > max_len:
            raise ValueError(f"document {d.key} has {len(d)} tokens > seq_len {max_len}; raise --seq-len")
        docs.append(d)
    return docs


def pack_first_fit(docs: list[Doc], seq_len: int) -> list[list[Doc]]:
    """Pack documents into rows of `seq_len` (first-fit decreasing, tasks may share a row);
    order inside rows is stable."""
    rows: list[list[Doc]] = []
    free: list[int] = []
    for d in sorted(docs, key=len, reverse=True):
        for i, room in enumerate(free):
            if len(d) <= room:
                rows[i].append(d)
                free[i] -= len(d)
                break
        else:
            rows.append([d])
            free.append(seq_len - len(d))
    return rows


def mixed_batch(cfg: Any, seq_len: int, num_docs: int, seed: int = 0, mix: DocMix | None = None) -> tuple[PackedBatch, list[Doc]]:
    """A packed batch of `num_docs` mixed documents (and the documents, for unpacked baselines)."""
    docs = make_documents(cfg, num_docs, seed, mix, max_len=seq_len)
    return rows_batch(cfg, pack_first_fit(docs, seq_len), seq_len), docs


def rows_batch(cfg: Any, rows: list[list[Doc]], seq_len: int) -> PackedBatch:
    flow = is_flow(cfg)
    batch = collate([Row(None, docs) for docs in rows], seq_len, PAD_ID, image_token_id(cfg), flow=flow)
    batch.validate(cfg.num_und_tokens if flow else cfg.num_image_tokens)
    return batch


def batch_with_rows(cfg: Any, rows: int, seq_len: int, seed: int = 0, mix: DocMix | None = None) -> PackedBatch:
    """Exactly `rows` packed rows: documents are added until packing fills that many rows."""
    n = rows
    while True:
        docs = make_documents(cfg, n, seed, mix, max_len=seq_len)
        packed = pack_first_fit(docs, seq_len)
        if len(packed) > rows:
            return rows_batch(cfg, packed[:rows], seq_len)
        n = int(n * 1.5) + 1


def fill_rows(cfg: Any, rows: int, seq_len: int, seed: int = 0, mix: DocMix | None = None, max_misses: int = 16) -> tuple[PackedBatch, list[Doc]]:
    """`rows` full rows of i.i.d. documents (und/text/gen in `mix.ratio`), first fit in stream
    order: each document goes into the first row with room; after `max_misses` documents in a
    row that fit nowhere, the rows are closed. Rows end up nearly full, like the training
    loader's (~2% pad at seq_len 4096, docs/performance.md), and the documents are an unsorted
    sample of the length distribution: the unpacked baseline batches them in this order.
    Returns the batch and the documents it holds, in stream order."""
    packed: list[list[Doc]] = [[] for _ in range(rows)]
    room = [seq_len] * rows
    used: list[Doc] = []
    misses = 0
    for d in _document_stream(cfg, seed, mix or DocMix(), seq_len):
        i = next((i for i in range(rows) if len(d) <= room[i]), None)
        if i is None:
            misses += 1
            if misses >= max_misses:
                break
            continue
        misses = 0
        packed[i].append(d)
        room[i] -= len(d)
        used.append(d)
    return rows_batch(cfg, packed, seq_len), used


def _document_stream(cfg: Any, seed: int, mix: DocMix, seq_len: int):
    i = 0
    while True:
        yield from make_documents(cfg, 10 * sum(mix.ratio), seed=seed * 100_003 + i, mix=mix, max_len=seq_len)
        i += 1
