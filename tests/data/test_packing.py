"""Packing: batch fields, document boundaries as the attention code consumes them (acceptance 4,
second half), look-ahead fill and pad fraction, exact per-step source counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from janus_train.contracts.batch import IGNORE_INDEX, NO_TASK, TASK_ID
from janus_train.contracts.batch import Doc, Row, collate
from janus_train.data.packing import TaskPacker


def _doc(n: int, key: str, task: str = "text", seed: int = 0, bos: int = 1) -> Doc:
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 100, n).astype(np.int32)
    ids[0] = bos
    target = np.ones(n, bool)
    target[0] = False
    return Doc(key=key, task=TASK_ID[task], ids=ids, target=target, gen_start=n)


def _spans_from_bos(batch, bos: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document, found without cu_seqlens: each document starts
    with BOS (the only BOS in it), the row's documents fill meta["doc_lengths"], and the pad
    tail after them is one more span."""
    spans = []
    for r in range(batch.num_rows):
        ids = batch.input_ids[r].tolist()
        used = sum(batch.meta["doc_lengths"][r])
        starts = [i for i, t in enumerate(ids[:used]) if t == bos]
        assert len(starts) == len(batch.meta["doc_lengths"][r]) and (not starts or starts[0] == 0)
        for a, b in zip(starts, starts[1:] + [used]):
            spans.append((r, a, b))
        if used < len(ids):
            spans.append((r, used, len(ids)))
    return spans


def test_collate_fields(tok):
    docs = [[_doc(5, "a"), _doc(3, "b")], [_doc(7, "c")]]
    rows = [Row(TASK_ID["text"], d) for d in docs]
    b = collate(rows, 10, pad_id=0, image_token_id=999)
    b.validate()
    assert b.cu_seqlens.tolist() == [0, 5, 8, 10, 17, 20]
    assert b.max_seqlen == 7
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert b.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    a_ids = docs[0][0].ids.tolist()
    assert b.labels[0, :5].tolist() == a_ids[1:] + [IGNORE_INDEX]  # last token of a doc: no label
    assert (b.labels[0, 8:] == IGNORE_INDEX).all() and (b.input_ids[0, 8:] == 0).all()
    assert ((b.loss_task == TASK_ID["text"]) == (b.labels != IGNORE_INDEX)).all()
    assert (b.loss_task[b.labels == IGNORE_INDEX] == NO_TASK).all()
    assert b.meta["keys"] == [["a", "b"], ["c"]] and b.meta["pad_tokens"] == 5


def test_packed_documents_never_attend_to_each_other(make_cfg, tok, image_cfg):
    """Real packed batches from the loader; masks built by the attention code from cu_seqlens."""
    from janus_train.data.loader import build_train_loader
    from janus_train.models.attention import PackedDocs, packed_attention

    ld = build_train_loader(make_cfg(seq_len=192, global_batch=8, micro_batch_rows=2), tok, image_cfg, 0, 1)
    checked = 0
    for mbs in (next(ld), next(ld)):
        for b in mbs:
            b.validate(image_cfg.num_image_tokens)
            spans = _spans_from_bos(b, tok.bos_id)
            truth = torch.full((b.num_rows, b.seq_len), -1)
            for k, (r, s, e) in enumerate(spans):
                truth[r, s:e] = k
                assert b.position_ids[r, s:e].tolist() == list(range(e - s))  # positions restart
                assert b.labels[r, e - 1] == IGNORE_INDEX  # no label reaches into the next document
            docs = PackedDocs.from_cu_seqlens(b.cu_seqlens, b.max_seqlen, b.num_rows, b.seq_len)
            mask = docs.dense_mask()[:, 0]  # [R, S, S]: query i may attend key j
            same = truth[:, :, None] == truth[:, None, :]
            assert not (mask & ~same).any(), "a token attends to another document"
            causal = torch.tril(torch.ones(b.seq_len, b.seq_len, dtype=torch.bool))
            assert torch.equal(mask, same & causal)
            # and the attention output of each document equals attending to it alone
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(b.num_rows, 2, b.seq_len, 8, generator=g) for _ in range(3))
            out = packed_attention(q, k, v, docs, "sdpa")
            for r, s, e in spans[:6]:
                alone = torch.nn.functional.scaled_dot_product_attention(
                    q[r : r + 1, :, s:e], k[r : r + 1, :, s:e], v[r : r + 1, :, s:e], is_causal=True
                )
                torch.testing.assert_close(out[r : r + 1, :, s:e], alone)
            checked += len(spans)
    assert checked > 20


def _lengths(kind: str, rng: np.random.Generator, n: int) -> list[int]:
    if kind == "und":  # BOS + ~45-token system prompt + 578-token image slot + QA turns
        return list(1 + 45 + 578 + rng.integers(20, 400, n))
    if kind == "gen":  # BOS + prompt (template + 10..150 caption tokens) + 576 codes
        return list(1 + 9 + rng.integers(10, 150, n) + 576)
    return list(np.minimum(4096, rng.geometric(1 / 600, n) + 2))  # text


@pytest.mark.parametrize("kind", ["und", "gen", "text"])
def test_lookahead_packing_keeps_pad_under_5_percent_at_4096(kind):
    rng = np.random.default_rng(0)
    pool = iter(_doc(int(n), f"{kind}{i}", seed=i) for i, n in enumerate(_lengths(kind, rng, 100_000)))
    packer = TaskPacker([1.0, 1.0] if kind == "gen" else [1.0], 4096, lambda s: next(pool), lookahead=64)
    used = total = 0
    for step in range(30):
        rows = packer.pack(16, step)
        used += sum(len(d) for row in rows for d in row)
        total += 16 * 4096
    assert 1 - used / total <= 0.05, f"{kind}: pad {1 - used / total:.3f}"


def test_period_rounding_makes_each_step_exact_and_nothing_starves():
    rng = np.random.default_rng(1)
    src = [iter(_doc(int(n), f"s{s}-{i}", seed=i) for i, n in enumerate(rng.integers(20, 90, 100_000))) for s in range(2)]
    packer = TaskPacker([1.0, 1.0], 256, lambda s: next(src[s]), lookahead=16, max_wait_steps=3)
    for step in range(50):
        rows = packer.pack(3, step)
        n = [sum(d.source == s for row in rows for d in row) for s in range(2)]
        assert n[0] == n[1] and n[0] > 0
        for row in rows:
            assert sum(len(d) for d in row) <= 256
            for d in row:
                assert step - d.arrived <= 3 + 1  # overdue documents go first
    # a 3:1 blend has period 4: every step's count is a multiple of 4 with exact shares
    src3 = [iter(_doc(30, f"t{s}-{i}") for i in range(10**6)) for s in range(2)]
    p3 = TaskPacker([3.0, 1.0], 100, lambda s: next(src3[s]), lookahead=8)
    for step in range(20):
        rows = p3.pack(5, step)
        n = [sum(d.source == s for row in rows for d in row) for s in range(2)]
        assert n[0] == 3 * n[1]


def test_packer_state_round_trip_restores_identical_rows():
    def make_src():
        rng = np.random.default_rng(3)
        lens = rng.integers(20, 120, 10_000)
        docs = [_doc(int(n), f"d{i}", seed=i) for i, n in enumerate(lens)]
        for i, d in enumerate(docs):
            d.pos = (i, 0)
        return docs

    docs = make_src()
    it = iter(docs)
    a = TaskPacker([1.0], 300, lambda s: next(it), lookahead=12)
    for step in range(5):
        a.pack(4, step)
    sd = a.state_dict()
    expect = [[[d.key for d in row] for row in a.pack(4, step)] for step in range(5, 15)]
    docs2 = make_src()
    frontier = sd["next_seq"][0]  # documents pulled so far (the stream position)
    it2 = iter(docs2[frontier:])
    b = TaskPacker([1.0], 300, lambda s: next(it2), lookahead=12)
    b.load_state_dict(sd, fetch=lambda s, positions: [docs2[p[0]] for p in positions])
    got = [[[d.key for d in row] for row in b.pack(4, step)] for step in range(5, 15)]
    assert got == expect
