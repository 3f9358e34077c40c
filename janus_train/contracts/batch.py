"""The packed batch: the one contract between the data path and the model.

A batch is `R` rows of `S` tokens. Each row holds whole documents (samples) laid end to end,
then padding. Documents never cross a row boundary. The model never needs to know which
task a row came from: everything it needs is per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

TASKS: tuple[str, ...] = ("und", "text", "gen")
TASK_ID: dict[str, int] = {name: i for i, name in enumerate(TASKS)}
IGNORE_INDEX = -100
NO_TASK = -1


@dataclass
class PackedBatch:
    """Packed rows ready for the model.

    Fields (shapes use R rows, S tokens per row, N und images):
      input_ids       long [R, S]  text token ids; at `gen_input_mask` positions a VQ code id
                                   (0..codebook-1); at `und_image_mask` positions the image
                                   placeholder id (its embedding is replaced by SigLIP features).
      position_ids    long [R, S]  restarts at 0 at every document start (RoPE positions).
      cu_seqlens      int32 [D+1]  document boundaries over the row-major flattened R*S stream:
                                   cu_seqlens[0] == 0, cu_seqlens[-1] == R*S, every row start is a
                                   boundary; padding at a row's end forms its own document(s).
                                   The attention backends build their masks from this only.
      max_seqlen      int          longest document (flash-attn varlen needs it).
      labels          long [R, S]  the target predicted from position i (already shifted):
                                   a text token id for und/text, a VQ code id for gen;
                                   IGNORE_INDEX (-100) where there is no loss.
      loss_task       long [R, S]  TASK_ID of the label at i (0 und, 1 text, 2 gen), NO_TASK (-1)
                                   where labels == IGNORE_INDEX.
      gen_input_mask  bool [R, S]  positions embedded by the generation input path: VQ codes
                                   (gen_embed + gen_aligner) for Janus-Pro; the G latent tokens
                                   of each gen document (generation encoder) for JanusFlow.
      und_image_mask  bool [R, S]  positions replaced by aligned SigLIP features; in row-major
                                   order they consume image 0's tokens, then image 1's, ...
                                   (JanusFlow: the <begin_of_image> position too, which takes
                                   its learned begin embedding).
      und_pixel_values uint8 [N, 3, H, W] or None  the und images, padded to square, not yet
                                   normalised: the vision tower normalises uint8 pixels on the
                                   device (a float tensor is taken as already normalised).
      meta            dict         sample keys, sources, counts (for logging, skip accounting
                                   and resume checks); `meta["host_counts"]` (`host_counts()`)
                                   holds the counts the step and the model need as plain ints.

    JanusFlow only (None for Janus-Pro), M gen documents in row-major order:
      gen_time_mask   bool [R, S]  the time-embedding position of each gen document.
      gen_latents     float [M, C, h, w]  clean latents x1, drawn from the stored posterior and
                                   multiplied by the VAE's scaling factor.
      gen_noise       float [M, C, h, w]  z0 ~ N(0, 1).
      gen_t           float [M]    flow time, z_t = t x1 + (1 - t) z0.
      gen_repa_pixels uint8 [M, 3, H, W] or None  each gen image at SigLIP's preprocessing, for
                                   representation alignment.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor
    loss_task: torch.Tensor
    gen_input_mask: torch.Tensor
    und_image_mask: torch.Tensor
    und_pixel_values: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    gen_time_mask: torch.Tensor | None = None
    gen_latents: torch.Tensor | None = None
    gen_noise: torch.Tensor | None = None
    gen_t: torch.Tensor | None = None
    gen_repa_pixels: torch.Tensor | None = None

    @property
    def is_flow(self) -> bool:
        return self.gen_time_mask is not None

    @property
    def num_gen_docs(self) -> int:
        return 0 if self.gen_latents is None else int(self.gen_latents.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> "PackedBatch":
        """Move tensors to `device`; cast floating tensors (pixels given as floats) to
        `float_dtype` if given. uint8 pixels stay uint8: the vision tower normalises them.

        The moved batch carries `host_counts()` in its meta (the collated batch's, or counted
        here from the host tensors of a batch built by hand), so the step and the model read
        them without waiting for the device."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
                if float_dtype is not None and value.is_floating_point():
                    value = value.to(float_dtype)
            out[f.name] = value
        if self.input_ids.device.type == "cpu" or HOST_COUNTS in self.meta:
            out["meta"] = {**self.meta, HOST_COUNTS: self.host_counts()}
        return PackedBatch(**out)

    def host_counts(self) -> dict[str, int]:
        """Plain-int counts of this batch (names: HOST_COUNT_NAMES): supervised tokens per task
        (`und`, `text`, `gen`), `gen_inputs` / `und_image_positions` / `gen_time_positions` (the
        True entries of those masks), `images` (und images), and for the FLOP model the documents
        holding a supervised token: `useful_docs`, their tokens `useful_tokens` and Σ length²
        `useful_len_sq`.

        Taken from `meta["host_counts"]` when there (`collate` and `to()` set it: change a
        batch's tensors after collate and the counts no longer describe it), else counted from
        the tensors: free on a host batch, a wait for the device on a device batch built by hand
        (correct, only slower)."""
        counts = self.meta.get(HOST_COUNTS)
        return counts if counts is not None else count_on_host(self)

    def doc_ids(self) -> torch.Tensor:
        """long [R, S]: a global document index for each token (equal ids may attend)."""
        return doc_ids_from_cu_seqlens(self.cu_seqlens, self.num_rows, self.seq_len)

    def supervised_tokens(self) -> dict[str, int]:
        """Number of supervised tokens per task in this batch."""
        counts = self.host_counts()
        return {name: counts[name] for name in TASKS}

    def loss_counts(self) -> dict[str, int]:
        """The normaliser of every loss the model reports for this batch: supervised tokens per
        task; for JanusFlow also latent elements (flow) and latent tokens aligned (repa)."""
        counts = self.supervised_tokens()
        if self.is_flow:
            m = self.num_gen_docs
            counts["flow"] = 0 if not m else int(self.gen_latents[0].numel()) * m
            counts["repa"] = self.host_counts()["gen_inputs"] if self.gen_repa_pixels is not None else 0
        return counts

    def validate(self, num_image_tokens: int | None = None) -> None:
        """Check the invariants above; raises ValueError naming the broken field."""
        r, s = self.input_ids.shape
        for name in ("position_ids", "labels", "loss_task", "gen_input_mask", "und_image_mask"):
            shape = tuple(getattr(self, name).shape)
            if shape != (r, s):
                raise ValueError(f"PackedBatch.{name} has shape {shape}, expected {(r, s)}")
        cu = self.cu_seqlens
        if cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != r * s:
            raise ValueError(f"PackedBatch.cu_seqlens must start at 0 and end at R*S={r * s}, got {cu.tolist()}")
        if bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError("PackedBatch.cu_seqlens must be strictly increasing")
        row_starts = torch.arange(0, r * s, s, device=cu.device)
        if not bool(torch.isin(row_starts, cu.to(row_starts.dtype)).all()):
            raise ValueError("PackedBatch.cu_seqlens: a document crosses a row boundary")
        lengths = cu[1:] - cu[:-1]
        if int(lengths.max()) > self.max_seqlen:
            raise ValueError(f"PackedBatch.max_seqlen={self.max_seqlen} < longest document {int(lengths.max())}")
        bad = (self.labels == IGNORE_INDEX) != (self.loss_task == NO_TASK)
        if bool(bad.any()):
            raise ValueError("PackedBatch.loss_task must be NO_TASK exactly where labels == IGNORE_INDEX")
        if bool((self.gen_input_mask & self.und_image_mask).any()):
            raise ValueError("PackedBatch: a position is both a gen code and an und image token")
        pv = self.und_pixel_values
        if pv is not None and (pv.dim() != 4 or not (pv.dtype == torch.uint8 or pv.is_floating_point())):
            raise ValueError(f"PackedBatch.und_pixel_values must be uint8 or float [N, 3, H, W], got {pv.dtype} {tuple(pv.shape)}")
        n_img_tok = int(self.und_image_mask.sum())
        n_img = 0 if self.und_pixel_values is None else int(self.und_pixel_values.shape[0])
        if num_image_tokens is not None and n_img_tok != n_img * num_image_tokens:
            raise ValueError(
                f"PackedBatch.und_image_mask marks {n_img_tok} positions but und_pixel_values holds "
                f"{n_img} images x {num_image_tokens} tokens"
            )


HOST_COUNTS = "host_counts"  # the meta key of `PackedBatch.host_counts()`
HOST_COUNT_NAMES: tuple[str, ...] = (*TASKS, "gen_inputs", "und_image_positions", "gen_time_positions", "images",
                                     "useful_docs", "useful_tokens", "useful_len_sq")


def count_on_host(batch: PackedBatch) -> dict[str, int]:
    """`PackedBatch.host_counts()` counted from the batch's tensors (device-to-host reads when
    they are on a device)."""
    task = batch.loss_task
    counts = {name: int((task == tid).sum()) for name, tid in TASK_ID.items()}
    counts["gen_inputs"] = int(batch.gen_input_mask.sum())
    counts["und_image_positions"] = int(batch.und_image_mask.sum())
    counts["gen_time_positions"] = 0 if batch.gen_time_mask is None else int(batch.gen_time_mask.sum())
    counts["images"] = 0 if batch.und_pixel_values is None else int(batch.und_pixel_values.shape[0])
    cu = batch.cu_seqlens.to(torch.int64)
    useful = torch.zeros(cu.numel() - 1, dtype=torch.bool, device=cu.device)
    useful[batch.doc_ids().reshape(-1)[task.reshape(-1) >= 0]] = True
    lengths = (cu[1:] - cu[:-1])[useful]
    counts["useful_docs"] = int(useful.sum())
    counts["useful_tokens"] = int(lengths.sum())
    counts["useful_len_sq"] = int((lengths * lengths).sum())
    return counts


def mask_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """long [count]: the row-major flat positions of `mask`'s True entries, which the caller
    knows to number `count` (`PackedBatch.host_counts()`). `mask.nonzero()` gives the same
    positions but must wait for the device to learn its output size."""
    return torch.nonzero_static(mask.reshape(-1), size=count)[:, 0]


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, rows: int, seq_len: int) -> torch.Tensor:
    """long [rows, seq_len] document index of every token of the flattened stream."""
    positions = torch.arange(rows * seq_len, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens.to(torch.long), positions, right=True) - 1
    return ids.view(rows, seq_len)


@dataclass(eq=False)
class Doc:
    """One tokenised sample.

    ids[i] is the input at position i (a text id, or a VQ code for i >= gen_start);
    target[i] says whether ids[i] is a loss target (predicted from position i-1), so
    target[0] is always False. und docs carry their images as `pixels` [n, 3, H, W]: uint8
    from the loader (normalised on the device), or float already normalised.

    JanusFlow gen docs: ids = BOS, prompt, time slot (at gen_start), G latent slots; no targets.
    `latent` holds the stored posterior (fp16 [2, C, h, w]: mean, std), `flow` the draw the
    loader made from it (x1, z0, t), `pixels` the image for REPA. `position_skip` k > 0 makes
    positions 0, k+1, k+2, ...: a document whose prompt was dropped for CFG keeps the RoPE
    positions of the full one, exactly as the sampler hides the prompt from the attention.
    """

    key: str
    task: int
    ids: np.ndarray  # int32 [L]
    target: np.ndarray  # bool [L]
    gen_start: int  # first code position; == L when the doc has no codes
    pixels: np.ndarray | None = None
    position_skip: int = 0
    latent: np.ndarray | None = None
    flow: tuple[np.ndarray, np.ndarray, float] | None = None
    source: int = 0  # index of the source within its task
    pos: tuple[int, int] = (0, 0)  # where the stream found it (slice number, offset)
    seq: int = 0  # arrival number in its source's buffer
    arrived: int = 0  # packing step at which it entered the buffer
    n: int = field(init=False, repr=False)  # length, cached: the packer asks for it a lot

    def __post_init__(self) -> None:
        self.n = int(self.ids.shape[0])

    def __len__(self) -> int:
        return self.n


# ---- rows -> PackedBatch --------------------------------------------------------------------


@dataclass
class Row:
    """One packed row. The loader's rows hold one task (`task`); a row built by hand may mix
    tasks (task=None): every per-token field comes from each document's own task."""

    task: int | None
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
    flow: bool = False,
) -> PackedBatch:
    """Lay the rows' documents end to end and build every PackedBatch field (`flow`: the
    JanusFlow fields, from gen documents that carry their `flow` draw)."""
    n_rows = len(rows)
    total = n_rows * seq_len
    id_parts: list[np.ndarray] = []
    target_parts: list[np.ndarray] = []
    lengths: list[int] = []
    doc_tasks: list[int] = []
    images: list[Any] = []
    gen_docs: list[tuple[int, Doc]] = []  # (flat start, doc) of JanusFlow gen documents
    skips: list[tuple[int, int, int]] = []  # (flat start, length, skip) of docs with a position skip
    keys: list[list[str]] = []
    sources: list[list[str]] = []
    pad_ids, no_target, arange = _constants(seq_len, pad_id, total)
    used_total = 0
    gen_task = TASK_ID["gen"]
    for r, row in enumerate(rows):
        used = 0
        for d in row.docs:
            start = r * seq_len + used
            id_parts.append(d.ids)
            target_parts.append(d.target)
            lengths.append(d.n)
            doc_tasks.append(d.task)
            used += d.n
            if flow and d.task == gen_task:
                gen_docs.append((start, d))
            elif d.pixels is not None:
                images.append(d.pixels)
            if d.position_skip:
                skips.append((start, d.n, d.position_skip))
        if used > seq_len:
            raise ValueError(f"row {r} holds {used} tokens > seq_len {seq_len}")
        if used < seq_len:  # the padding tail is a document of its own
            id_parts.append(pad_ids[: seq_len - used])
            target_parts.append(no_target[: seq_len - used])
            lengths.append(seq_len - used)
            doc_tasks.append(NO_TASK)
        used_total += used
        keys.append([d.key for d in row.docs])
        names = source_names.get(row.task) if source_names and row.task is not None else None
        sources.append([names[d.source] if names else str(d.source) for d in row.docs])
    ids = np.concatenate(id_parts, dtype=np.int64)
    target = np.concatenate(target_parts)
    len_arr = np.asarray(lengths, dtype=np.int64)
    cu = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(len_arr, out=cu[1:])
    positions = arange - np.repeat(cu[:-1], len_arr)
    for start, n, skip in skips:
        positions[start + 1 : start + n] += skip
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    # BOS and padding are never targets, so a shifted label never crosses a document.
    np.copyto(labels[:-1], ids[1:], where=target[1:])
    shape = (n_rows, seq_len)
    # The task of every token: its document's (padding: NO_TASK).
    token_task = np.repeat(np.asarray(doc_tasks, dtype=np.int64), len_arr)
    loss_task = np.where(labels != IGNORE_INDEX, token_task, NO_TASK).reshape(shape)
    if TASK_ID["und"] in doc_tasks:
        und = (ids == image_token_id) & (token_task == TASK_ID["und"])
        if flow:  # the position before each image's run holds JanusFlow's begin embedding
            und[:-1] |= und[1:] & ~und[:-1]
        und = und.reshape(shape)
    else:  # no und document: skip a full-batch compare
        und = np.zeros(shape, dtype=bool)
    flow_fields: dict[str, Any] = {}
    if flow:
        time_mask = np.zeros(total, dtype=bool)
        gen = np.zeros(total, dtype=bool)
        for start, d in gen_docs:
            time_mask[start + d.gen_start] = True
            gen[start + d.gen_start + 1 : start + d.n] = True
        gen = gen.reshape(shape)
        flow_fields["gen_time_mask"] = torch.from_numpy(time_mask.reshape(shape))
        if gen_docs:
            if any(d.flow is None for _, d in gen_docs):
                raise ValueError("a JanusFlow gen document reached collate without its latent draw (Doc.flow)")
            flow_fields["gen_latents"] = torch.from_numpy(np.stack([d.flow[0] for _, d in gen_docs]))
            flow_fields["gen_noise"] = torch.from_numpy(np.stack([d.flow[1] for _, d in gen_docs]))
            flow_fields["gen_t"] = torch.tensor([float(d.flow[2]) for _, d in gen_docs], dtype=torch.float32)
            if all(d.pixels is not None for _, d in gen_docs):
                flow_fields["gen_repa_pixels"] = torch.from_numpy(np.concatenate([_np(d.pixels) for _, d in gen_docs]))
    else:
        # In gen documents the targets are exactly the code positions (code k is predicted from
        # k-1, code 0 from <begin_of_image>); other documents hold no codes.
        gen = (target & (token_task == gen_task)).reshape(shape)
    pix = None
    if images:
        # uint8, gathered from the decode buffers; the vision tower normalises on the device.
        pix = torch.from_numpy(np.concatenate([_np(p) for p in images]))
    out_meta = {
        "keys": keys,
        "sources": sources,
        "row_tasks": [TASKS[row.task] if row.task is not None else "mixed" for row in rows],
        "doc_lengths": [[d.n for d in row.docs] for row in rows],
        "num_docs": sum(len(row.docs) for row in rows),
        "pad_tokens": int(total - used_total),
    }
    if meta:
        out_meta.update(meta)
    batch = PackedBatch(
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
        **flow_fields,
    )
    # Counted here, on the loader's CPU, so the step and the model never read them from a device.
    out_meta[HOST_COUNTS] = count_on_host(batch)
    return batch


def _np(x: Any) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else x
