"""Per-source sample streams of one rank, decoded by a pool of worker processes.

Which samples a rank reads is fixed by arithmetic, not by reading order: a source's shards are
cut into slices of `chunk_size` consecutive samples; each epoch e visits all slices in a
permutation drawn from (seed, source name, e); the epochs are chained into one endless slice
sequence and rank r of D takes its elements r, r+D, r+2D, ... So ranks read disjoint parts,
every rank always has data (even with fewer slices than ranks), and position (k, o), "offset o
of the rank's k-th slice", names a sample forever. Workers are stateless: they get "decode
samples [a, b) of shard X" and send back columnar tokenised documents, so the number of
workers never changes what a rank sees, and a stream resumes by asking for (k, o) again.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import zlib
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch

from janus_train.data.formats import SampleError
from janus_train.contracts.batch import Doc
from janus_train.data.shards import ShardInfo, ShardReader
from janus_train.data.tokenize import DocBuilder

log = logging.getLogger("janus_train.data")
LOG_FIRST = 50  # skipped samples logged in full per source and reason, then every 1000th


@dataclass(frozen=True)
class ReadRequest:
    task: str
    shard: str  # absolute path
    start: int  # first sample index in the shard
    stop: int
    wanted: tuple[int, ...] | None = None  # offsets (from start) to decode; None = all


@dataclass
class DecodedChunk:
    """A request's documents in columnar form (cheap to pickle between processes)."""

    offsets: list[int]  # offset (from request start) of each item, ascending
    keys: list[str]
    errors: list[tuple[str, str] | None]  # (reason, detail) for skipped items
    lengths: np.ndarray  # int64 [items]; 0 for errors
    gen_starts: np.ndarray  # int64 [items]
    tasks: np.ndarray  # int64 [items]
    ids: np.ndarray  # int32, concatenated
    target: np.ndarray  # bool, concatenated
    n_images: np.ndarray  # int64 [items]
    # uint8 [images, 3, H, W]. A torch tensor so that, coming from a worker, it travels through
    # shared memory (torch's multiprocessing reductions) instead of being pickled.
    pixels: torch.Tensor | None
    # Decoding in the training process skips the columnar round trip and hands over the docs.
    docs: list[Doc | None] | None = None
    # JanusFlow gen documents: position skips (int64 [items]) and stored latents (fp16
    # [items with a latent, 2, C, h, w]); None for other tasks.
    position_skips: np.ndarray | None = None
    latents: np.ndarray | None = None

    def items(self) -> list[tuple[int, str, Doc | SampleError]]:
        if self.docs is not None:
            return [
                (off, key, doc if doc is not None else SampleError(*err))  # type: ignore[misc]
                for off, key, doc, err in zip(self.offsets, self.keys, self.docs, self.errors)
            ]
        out: list[tuple[int, str, Doc | SampleError]] = []
        p = img = lat = 0
        for i, off in enumerate(self.offsets):
            err = self.errors[i]
            if err is not None:
                out.append((off, self.keys[i], SampleError(err[0], err[1])))
                continue
            n, k = int(self.lengths[i]), int(self.n_images[i])
            pix = self.pixels[img : img + k] if k else None
            doc = Doc(
                key=self.keys[i],
                task=int(self.tasks[i]),
                ids=self.ids[p : p + n],
                target=self.target[p : p + n],
                gen_start=int(self.gen_starts[i]),
                pixels=pix,
            )
            if self.position_skips is not None:
                doc.position_skip = int(self.position_skips[i])
            if self.latents is not None:
                doc.latent = self.latents[lat]
                lat += 1
            out.append((off, self.keys[i], doc))
            p += n
            img += k
        return out


class Decoder:
    """Reads and tokenises requests; one per worker process (or in-process)."""

    def __init__(self, builder: DocBuilder, in_worker: bool = False) -> None:
        self.builder = builder
        self.reader = ShardReader()
        self.in_worker = in_worker  # results cross a process boundary

    def __call__(self, req: ReadRequest) -> DecodedChunk:
        wanted = None if req.wanted is None else set(req.start + o for o in req.wanted)
        raws = self.reader.read(req.shard, req.start, req.stop, None if wanted is None else wanted.__contains__)
        pixels = None
        # One image per und sample (and per JanusFlow gen sample, for REPA): decode straight
        # into the batch buffer.
        if req.task == "und" or (req.task == "gen" and self.builder.gen_pixels):
            side = self.builder.image_size
            pixels = torch.empty((max(1, len(raws)), 3, side, side), dtype=torch.uint8)
            if self.in_worker:
                pixels.share_memory_()  # allocated in shm, so writing it is the only copy
            slots = pixels.numpy()
        offsets, keys, errors, docs = [], [], [], []
        n_img = 0
        for raw in raws:
            offsets.append(raw.index - req.start)
            keys.append(raw.key)
            if raw.error is not None:
                errors.append((raw.error.reason, raw.error.detail))
                docs.append(None)
                continue
            try:
                doc = self.builder.build(req.task, raw.key, raw.parts, slots[n_img] if pixels is not None else None)
                errors.append(None)
                docs.append(doc)
                if doc.pixels is not None:
                    n_img += doc.pixels.shape[0]
            except SampleError as e:
                errors.append((e.reason, e.detail))
                docs.append(None)
        if not self.in_worker:  # in-process: no need to pack the docs into arrays
            empty = np.zeros(0, np.int64)
            return DecodedChunk(offsets, keys, errors, empty, empty, empty, np.zeros(0, np.int32), np.zeros(0, bool), empty, pixels, docs=docs)
        good = [d for d in docs if d is not None]
        flow = req.task == "gen" and self.builder.gen_kind == "flow"
        return DecodedChunk(
            offsets=offsets,
            keys=keys,
            errors=errors,
            lengths=np.asarray([len(d) if d is not None else 0 for d in docs], dtype=np.int64),
            gen_starts=np.asarray([d.gen_start if d is not None else 0 for d in docs], dtype=np.int64),
            tasks=np.asarray([d.task if d is not None else -1 for d in docs], dtype=np.int64),
            ids=np.concatenate([d.ids for d in good]) if good else np.zeros(0, np.int32),
            target=np.concatenate([d.target for d in good]) if good else np.zeros(0, bool),
            n_images=np.asarray([0 if d is None or d.pixels is None else d.pixels.shape[0] for d in docs], dtype=np.int64),
            pixels=pixels[:n_img] if pixels is not None and n_img else None,
            position_skips=np.asarray([d.position_skip if d is not None else 0 for d in docs], dtype=np.int64) if flow else None,
            latents=np.stack([d.latent for d in good]) if flow and good else None,
        )


_WORKER_DECODER: Decoder | None = None


def _init_worker(builder: DocBuilder) -> None:
    global _WORKER_DECODER
    torch.set_num_threads(1)  # workers do numpy/PIL work; never oversubscribe the cores
    _WORKER_DECODER = Decoder(builder, in_worker=True)


def _decode_in_worker(req: ReadRequest) -> DecodedChunk:
    assert _WORKER_DECODER is not None
    return _WORKER_DECODER(req)


class _Deferred:
    """A future computed on first `result()` (decoding in the training process)."""

    def __init__(self, fn: Callable[[ReadRequest], DecodedChunk], req: ReadRequest) -> None:
        self.fn, self.req, self.value = fn, req, None

    def result(self) -> DecodedChunk:
        if self.value is None:
            self.value = self.fn(self.req)
        return self.value


class DecodePool:
    """Worker processes that decode ReadRequests; num_workers=0 decodes inline, lazily."""

    def __init__(self, builder: DocBuilder, num_workers: int, start_method: str = "fork") -> None:
        self.num_workers = num_workers
        if num_workers > 0:
            self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
                max_workers=num_workers,
                mp_context=mp.get_context(start_method),
                initializer=_init_worker,
                initargs=(builder,),
            )
            self._inline = None
        else:
            self._pool = None
            self._inline = Decoder(builder)

    def submit(self, req: ReadRequest) -> Future | _Deferred:
        if self._pool is not None:
            return self._pool.submit(_decode_in_worker, req)
        assert self._inline is not None
        return _Deferred(self._inline, req)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@dataclass(frozen=True)
class Slice:
    shard: int
    start: int
    stop: int


class SourcePlan:
    """The endless slice sequence of one source on one rank (see module docstring)."""

    def __init__(self, name: str, shards: list[ShardInfo], chunk_size: int, seed: int, dp_rank: int, dp_size: int) -> None:
        self.name, self.shards = name, shards
        self.slices = [
            Slice(si, a, min(a + chunk_size, sh.count)) for si, sh in enumerate(shards) for a in range(0, sh.count, chunk_size)
        ]
        if not self.slices:
            raise ValueError(f"source {name!r} has no samples")
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self._salt = zlib.crc32(name.encode())

    @lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self._salt, epoch]).permutation(len(self.slices))

    def slice(self, k: int) -> Slice:
        """The rank's k-th slice."""
        j = self.dp_rank + k * self.dp_size
        n = len(self.slices)
        return self.slices[int(self._perm(j // n)[j % n])]

    def request(self, task: str, k: int, wanted: tuple[int, ...] | None = None) -> ReadRequest:
        s = self.slice(k)
        return ReadRequest(task=task, shard=self.shards[s.shard].path, start=s.start, stop=s.stop, wanted=wanted)


class SkipStats:
    """Skipped samples per source and reason (what loader.stats() reports)."""

    def __init__(self) -> None:
        self.skipped: dict[str, dict[str, int]] = {}
        self.samples: dict[str, int] = {}

    def skip(self, source: str, reason: str) -> int:
        d = self.skipped.setdefault(source, {})
        d[reason] = d.get(reason, 0) + 1
        return d[reason]

    def take(self, source: str) -> None:
        self.samples[source] = self.samples.get(source, 0) + 1

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": {k: dict(v) for k, v in self.skipped.items()}, "samples": dict(self.samples)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.skipped = {k: {r: int(n) for r, n in v.items()} for k, v in sd.get("skipped", {}).items()}
        self.samples = {k: int(v) for k, v in sd.get("samples", {}).items()}


class SourceStream:
    """Documents of one source on one rank, in stream order, with damaged samples skipped
    (counted in `stats` and logged with shard and key)."""

    def __init__(self, task: str, label: str, plan: SourcePlan, pool: DecodePool, prefetch: int, stats: SkipStats) -> None:
        self.task, self.label, self.plan, self.pool = task, label, plan, pool
        self.prefetch, self.stats = prefetch, stats
        self.next_k = 0  # next slice to request
        self.first_offset = 0  # offsets below this in slice next_k were consumed before a restore
        self.pending: deque[tuple[int, Any]] = deque()
        self.ready: deque[tuple[tuple[int, int], Doc | SampleError | None, str, str]] = deque()
        self.frontier: tuple[int, int] = (0, 0)

    def _request_more(self) -> None:
        while len(self.pending) < self.prefetch:
            k = self.next_k
            wanted = None
            if self.first_offset:
                s = self.plan.slice(k)
                wanted = tuple(range(self.first_offset, s.stop - s.start))
                self.first_offset = 0
            self.pending.append((k, self.pool.submit(self.plan.request(self.task, k, wanted))))
            self.next_k += 1

    def _pump(self) -> None:
        self._request_more()
        k, fut = self.pending.popleft()
        chunk: DecodedChunk = fut.result()
        shard = self.plan.request(self.task, k).shard
        for off, key, item in chunk.items():
            self.ready.append(((k, off), item, shard, key))
        if not chunk.offsets:
            self.ready.append(((k + 1, -1), None, shard, ""))  # nothing left in slice k: frontier (k+1, 0)
        self._request_more()

    def next_doc(self) -> Doc:
        for _ in range(1_000_000):
            while not self.ready:
                self._pump()
            pos, item, shard, key = self.ready.popleft()
            self.frontier = (pos[0], pos[1] + 1)
            if item is None:
                continue
            if isinstance(item, SampleError):
                n = self.stats.skip(self.label, item.reason)
                # Every skip is counted; the log names the first ones and then every 1000th,
                # so a badly damaged source cannot flood it.
                if n <= LOG_FIRST or n % 1000 == 0:
                    log.warning(
                        "skipped %s sample %s of %s in shard %s: %s (%d %s skips so far)",
                        item.reason, key, self.label, shard, item.detail, n, item.reason,
                    )
                continue
            item.pos = pos
            self.stats.take(self.label)
            return item
        raise RuntimeError(f"source {self.label}: a million samples in a row were unusable; see the skip log")

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"frontier": list(self.frontier)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        k, o = (int(x) for x in sd["frontier"])
        self.pending.clear()
        self.ready.clear()
        s = self.plan.slice(k)
        if o >= s.stop - s.start:
            k, o = k + 1, 0
        self.next_k, self.first_offset, self.frontier = k, o, (k, o)

    def fetch(self, positions: list[tuple[int, int]]) -> list[Doc]:
        """Re-read documents at the given positions (to refill a restored look-ahead buffer)."""
        by_slice: dict[int, list[int]] = {}
        for k, o in positions:
            by_slice.setdefault(k, []).append(o)
        futures = {k: self.pool.submit(self.plan.request(self.task, k, tuple(sorted(set(offs))))) for k, offs in by_slice.items()}
        found: dict[tuple[int, int], Doc] = {}
        for k, fut in futures.items():
            for off, key, item in fut.result().items():
                if isinstance(item, SampleError):
                    raise RuntimeError(
                        f"source {self.label}: buffered sample {key} (slice {k}, offset {off}) no longer decodes "
                        f"({item}); the data changed since the state was saved"
                    )
                item.pos = (k, off)
                found[(k, off)] = item
        return [found[tuple(p)] for p in positions]
