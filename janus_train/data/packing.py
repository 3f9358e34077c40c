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

from typing import Any, Callable

import numpy as np


from janus_train.contracts.batch import Doc
from janus_train.data.mixing import SourceBlender


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
