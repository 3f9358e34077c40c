"""Packing tokenised documents into rows of `seq_len`, and rows into a `PackedBatch`.

A row holds documents of one task only, laid end to end and followed by padding. Each
document starts with BOS at position 0 (positions restart per document); `cu_seqlens` marks
every document and every row's padding tail as its own segment, so the attention backends
never let one document see another (and nothing attends across rows).

Choosing documents (`TaskPacker.pack`): documents of a task arrive from its sources into one
look-ahead buffer per source. The source of the next document is always the one the
`SourceBlender` names (so sources keep their weights exactly, counted on packed documents),
and from that source's buffer we take the longest document that fits the fullest row that
can still take that source's shortest document; if that would close the row with a gap, we
instead take the first document of the fullest pair (this source, then the blender's next
source) that fits. When nothing fits, the step's rows for this task are closed and padded.
This fills one row nearly to the brim before the next and keeps the pad fraction low
(docs/performance.md). A document that waited `max_wait_steps` steps goes next regardless, so
nothing starves. When the blender has a short period P (weights like 1:1 -> P=2), the
documents packed per step are rounded down to a multiple of P by returning the last ones to
their buffers, which makes every step's per-rank source counts exact (and therefore exact
across ranks too).

Over-long documents are handled by the tokeniser (`tokenize.py`) before they get here: text is
truncated to seq_len (or dropped with truncation="drop"), an und conversation is truncated if
its image and at least one answer token stay inside seq_len (else dropped), a gen document is
never cut (its codes must be whole) and is dropped. Drops are counted as "too_long".
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from janus_train.data.batch import IGNORE_INDEX, NO_TASK, TASK_ID, TASKS, PackedBatch
from janus_train.data.mixing import SourceBlender


@dataclass(eq=False)
class Doc:
    """One tokenised sample.

    ids[i] is the input at position i (a text id, or a VQ code for i >= gen_start);
    target[i] says whether ids[i] is a loss target (predicted from position i-1), so
    target[0] is always False. und docs carry their images as uint8 [n, H, W, 3].
    """

    key: str
    task: int
    ids: np.ndarray  # int32 [L]
    target: np.ndarray  # bool [L]
    gen_start: int  # first code position; == L when the doc has no codes
    pixels: np.ndarray | None = None
    source: int = 0  # index of the source within its task
    pos: tuple[int, int] = (0, 0)  # where the stream found it (slice number, offset)
    seq: int = 0  # arrival number in its source's buffer
    arrived: int = 0  # packing step at which it entered the buffer
    n: int = field(init=False, repr=False)  # length, cached: the packer asks for it a lot

    def __post_init__(self) -> None:
        self.n = int(self.ids.shape[0])

    def __len__(self) -> int:
        return self.n


class SourceBuffer:
    """Look-ahead documents of one source: sorted by length for best fit, and by arrival."""

    def __init__(self) -> None:
        self.lens: list[tuple[int, int]] = []  # (length, seq), sorted
        self.nlens: list[int] = []  # the lengths alone, same order (for vectorised search)
        self.docs: dict[int, Doc] = {}  # seq -> doc
        self._ages: list[int] = []  # heap of seqs; entries of removed docs are dropped lazily

    def __len__(self) -> int:
        return len(self.docs)

    def add(self, doc: Doc) -> None:
        i = bisect.bisect_left(self.lens, (doc.n, doc.seq))
        self.lens.insert(i, (doc.n, doc.seq))
        self.nlens.insert(i, doc.n)
        self.docs[doc.seq] = doc
        heapq.heappush(self._ages, doc.seq)

    def remove(self, doc: Doc) -> None:
        i = bisect.bisect_left(self.lens, (doc.n, doc.seq))
        del self.lens[i]
        del self.nlens[i]
        del self.docs[doc.seq]

    def shortest(self) -> int:
        return self.lens[0][0]

    def longest_at_most(self, n: int) -> Doc | None:
        i = bisect.bisect_right(self.lens, (n, 1 << 62)) - 1
        return self.docs[self.lens[i][1]] if i >= 0 else None

    def oldest(self) -> Doc:
        while self._ages[0] not in self.docs:
            heapq.heappop(self._ages)
        return self.docs[self._ages[0]]


class TaskPacker:
    """Packs one task's documents on one rank; `pull(source)` returns that source's next doc."""

    def __init__(
        self,
        weights: list[float],
        seq_len: int,
        pull: Callable[[int], Doc],
        lookahead: int = 64,
        max_wait_steps: int = 4,
        max_period: int = 64,
    ) -> None:
        self.seq_len = seq_len
        self.pull = pull
        self.lookahead = lookahead
        self.max_wait_steps = max_wait_steps
        self.blender = SourceBlender(weights, max_period=max_period)
        # a row gap this small is not worth a pair search (0.5% of a row)
        self.tolerance = max(4, seq_len // 200)
        self.buffers = [SourceBuffer() for _ in weights]
        self.next_seq = [0] * len(weights)

    def _fill(self, s: int, step: int) -> None:
        buf = self.buffers[s]
        while len(buf) < self.lookahead:
            doc = self.pull(s)
            doc.source, doc.seq, doc.arrived = s, self.next_seq[s], step
            self.next_seq[s] += 1
            buf.add(doc)

    def _next_source_after(self, s: int) -> int:
        self.blender.advance(s)
        nxt = self.blender.peek()
        self.blender.undo(s)
        return nxt

    def _pair_first(self, s: int, room: int, step: int) -> tuple[Doc | None, int]:
        """The doc of source s that starts the fullest pair (this source's doc, then one of the
        source the blender names next) fitting `room`, and that pair's length."""
        nxt = self._next_source_after(s)
        self._fill(nxt, step)
        a = np.array(self.buffers[s].nlens)
        b = a if nxt == s else np.array(self.buffers[nxt].nlens)
        j = np.searchsorted(b, room - a, side="right") - 1  # longest partner of each a
        if nxt == s:
            j = np.where(j == np.arange(len(a)), j - 1, j)  # a document cannot pair with itself
        ok = j >= 0
        if not ok.any():
            return None, 0
        totals = np.where(ok, a + b[np.maximum(j, 0)], -1)
        i = int(totals.argmax())
        return self.buffers[s].docs[self.buffers[s].lens[i][1]], int(totals[i])

    def pack(self, num_rows: int, step: int) -> list[list[Doc]]:
        """Fill `num_rows` rows for training step `step`."""
        rows: list[list[Doc]] = [[] for _ in range(num_rows)]
        free: list[tuple[int, int]] = [(self.seq_len, r) for r in range(num_rows)]
        placed: list[tuple[Doc, int]] = []
        while free:
            s = self.blender.peek()
            self._fill(s, step)
            buf = self.buffers[s]
            oldest = buf.oldest()
            shortest = buf.shortest()
            if step - oldest.arrived >= self.max_wait_steps:
                i = bisect.bisect_left(free, (oldest.n, -1))
                doc = oldest
            else:
                i = bisect.bisect_left(free, (shortest, -1))
                doc = None
            if i == len(free):
                break
            room, r = free.pop(i)
            if doc is None:
                doc = buf.longest_at_most(room)
                assert doc is not None
                gap = room - doc.n
                if self.tolerance < gap < 2 * shortest and room >= 2 * shortest:
                    # The best single fit would close the row with a gap: look one document
                    # further ahead for a pair that fills it better.
                    first, total = self._pair_first(s, room, step)
                    if first is not None and total > doc.n:
                        doc = first
            buf.remove(doc)
            self.blender.advance(s)
            rows[r].append(doc)
            placed.append((doc, r))
            if room - doc.n > 0:
                bisect.insort(free, (room - doc.n, r))
        period = self.blender.period
        if period and len(placed) >= period:
            for doc, r in reversed(placed[len(placed) - len(placed) % period :]):
                rows[r].pop()
                self.buffers[doc.source].add(doc)
                self.blender.undo(doc.source)
        return rows

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "blender": self.blender.state_dict(),
            "next_seq": list(self.next_seq),
            "buffers": [
                [[list(d.pos), d.seq, d.arrived] for d in sorted(b.docs.values(), key=lambda d: d.seq)] for b in self.buffers
            ],
        }

    def load_state_dict(self, sd: dict[str, Any], fetch: Callable[[int, list[tuple[int, int]]], list[Doc]]) -> None:
        """Restore; `fetch(source, positions)` re-reads the buffered documents."""
        self.blender.load_state_dict(sd["blender"])
        self.next_seq = list(sd["next_seq"])
        self.buffers = [SourceBuffer() for _ in self.buffers]
        for s, entries in enumerate(sd["buffers"]):
            docs = fetch(s, [tuple(e[0]) for e in entries])
            for doc, (_, seq, arrived) in zip(docs, entries):
                doc.source, doc.seq, doc.arrived = s, seq, arrived
                self.buffers[s].add(doc)


# ---- rows -> PackedBatch --------------------------------------------------------------------


@dataclass
class Row:
    task: int
    docs: list[Doc] = field(default_factory=list)


_CONSTANTS: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _constants(seq_len: int, pad_id: int, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read-only pad run, no-target run and position ramp, built once per shape."""
    key = (seq_len, pad_id, total)
    c = _CONSTANTS.get(key)
    if c is None:
        c = (np.full(seq_len, pad_id, dtype=np.int32), np.zeros(seq_len, dtype=bool), np.arange(total, dtype=np.int64))
        for a in c:
            a.flags.writeable = False
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        _CONSTANTS[key] = c
    return c


def collate(
    rows: list[Row],
    seq_len: int,
    pad_id: int,
    image_token_id: int,
    source_names: dict[int, list[str]] | None = None,
    meta: dict[str, Any] | None = None,
) -> PackedBatch:
    """Lay the rows' documents end to end and build every PackedBatch field."""
    n_rows = len(rows)
    total = n_rows * seq_len
    id_parts: list[np.ndarray] = []
    target_parts: list[np.ndarray] = []
    lengths: list[int] = []
    images: list[Any] = []
    keys: list[list[str]] = []
    sources: list[list[str]] = []
    pad_ids, no_target, arange = _constants(seq_len, pad_id, total)
    used_total = 0
    for r, row in enumerate(rows):
        used = 0
        for d in row.docs:
            id_parts.append(d.ids)
            target_parts.append(d.target)
            lengths.append(d.n)
            used += d.n
            if d.pixels is not None:
                images.append(d.pixels)
        if used > seq_len:
            raise ValueError(f"row {r} holds {used} tokens > seq_len {seq_len}")
        if used < seq_len:  # the padding tail is a document of its own
            id_parts.append(pad_ids[: seq_len - used])
            target_parts.append(no_target[: seq_len - used])
            lengths.append(seq_len - used)
        used_total += used
        keys.append([d.key for d in row.docs])
        names = source_names.get(row.task) if source_names else None
        sources.append([names[d.source] if names else str(d.source) for d in row.docs])
    ids = np.concatenate(id_parts, dtype=np.int64)
    target = np.concatenate(target_parts)
    len_arr = np.asarray(lengths, dtype=np.int64)
    cu = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(len_arr, out=cu[1:])
    positions = arange - np.repeat(cu[:-1], len_arr)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    # BOS and padding are never targets, so a shifted label never crosses a document.
    np.copyto(labels[:-1], ids[1:], where=target[1:])
    shape = (n_rows, seq_len)
    # Rows are task-homogeneous: per-row task ids broadcast over the row.
    row_task = np.asarray([row.task for row in rows], dtype=np.int64)[:, None]
    labels2 = labels.reshape(shape)
    loss_task = np.where(labels2 != IGNORE_INDEX, row_task, NO_TASK)
    # In gen rows the targets are exactly the code positions (code k is predicted from k-1,
    # code 0 from <begin_of_image>); und rows hold no codes, so gen_input_mask is target & gen.
    gen = target.reshape(shape) & (row_task == TASK_ID["gen"])
    if any(row.task == TASK_ID["und"] for row in rows):
        und = (ids.reshape(shape) == image_token_id) & (row_task == TASK_ID["und"])
    else:  # no und row: skip a full-batch compare
        und = np.zeros(shape, dtype=bool)
    pix = None
    if images:
        # uint8, gathered from the decode buffers; the vision tower normalises on the device.
        pix = torch.from_numpy(np.concatenate([p.numpy() if isinstance(p, torch.Tensor) else p for p in images]))
    out_meta = {
        "keys": keys,
        "sources": sources,
        "row_tasks": [TASKS[row.task] for row in rows],
        "doc_lengths": [[d.n for d in row.docs] for row in rows],
        "num_docs": sum(len(row.docs) for row in rows),
        "pad_tokens": int(total - used_total),
    }
    if meta:
        out_meta.update(meta)
    return PackedBatch(
        input_ids=torch.from_numpy(ids).view(shape),
        position_ids=torch.from_numpy(positions).view(shape),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(len_arr.max()),
        labels=torch.from_numpy(labels).view(shape),
        loss_task=torch.from_numpy(loss_task),
        gen_input_mask=torch.from_numpy(gen),
        und_image_mask=torch.from_numpy(und),
        und_pixel_values=pix,
        meta=out_meta,
    )
