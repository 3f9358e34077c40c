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
      gen_input_mask  bool [R, S]  positions embedded by gen_embed + gen_aligner.
      und_image_mask  bool [R, S]  positions replaced by aligned SigLIP features; in row-major
                                   order they consume image 0's tokens, then image 1's, ...
      und_pixel_values uint8 [N, 3, H, W] or None  the und images, padded to square, not yet
                                   normalised: the vision tower normalises uint8 pixels on the
                                   device (a float tensor is taken as already normalised).
      meta            dict         not used by the model: sample keys, sources, counts (for
                                   logging, skip accounting and resume checks).
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

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> "PackedBatch":
        """Move tensors to `device`; cast floating tensors (pixels given as floats) to
        `float_dtype` if given. uint8 pixels stay uint8: the vision tower normalises them."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
                if float_dtype is not None and value.is_floating_point():
                    value = value.to(float_dtype)
            out[f.name] = value
        return PackedBatch(**out)

    def doc_ids(self) -> torch.Tensor:
        """long [R, S]: a global document index for each token (equal ids may attend)."""
        return doc_ids_from_cu_seqlens(self.cu_seqlens, self.num_rows, self.seq_len)

    def supervised_tokens(self) -> dict[str, int]:
        """Number of supervised tokens per task in this batch."""
        return {name: int((self.loss_task == tid).sum()) for name, tid in TASK_ID.items()}

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
) -> PackedBatch:
    """Lay the rows' documents end to end and build every PackedBatch field."""
    n_rows = len(rows)
    total = n_rows * seq_len
    id_parts: list[np.ndarray] = []
    target_parts: list[np.ndarray] = []
    lengths: list[int] = []
    doc_tasks: list[int] = []
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
            doc_tasks.append(d.task)
            used += d.n
            if d.pixels is not None:
                images.append(d.pixels)
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
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    # BOS and padding are never targets, so a shifted label never crosses a document.
    np.copyto(labels[:-1], ids[1:], where=target[1:])
    shape = (n_rows, seq_len)
    # The task of every token: its document's (padding: NO_TASK).
    token_task = np.repeat(np.asarray(doc_tasks, dtype=np.int64), len_arr)
    loss_task = np.where(labels != IGNORE_INDEX, token_task, NO_TASK).reshape(shape)
    # In gen documents the targets are exactly the code positions (code k is predicted from
    # k-1, code 0 from <begin_of_image>); other documents hold no codes.
    gen = (target & (token_task == TASK_ID["gen"])).reshape(shape)
    if TASK_ID["und"] in doc_tasks:
        und = ((ids == image_token_id) & (token_task == TASK_ID["und"])).reshape(shape)
    else:  # no und document: skip a full-batch compare
        und = np.zeros(shape, dtype=bool)
    pix = None
    if images:
        # uint8, gathered from the decode buffers; the vision tower normalises on the device.
        pix = torch.from_numpy(np.concatenate([p.numpy() if isinstance(p, torch.Tensor) else p for p in images]))
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
