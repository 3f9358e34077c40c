"""The packed batch: the one contract between the data path and the model.

A batch is `R` rows of `S` tokens. Each row holds whole documents (samples) laid end to end,
then padding. Documents never cross a row boundary. The model never needs to know which
task a row came from: everything it needs is per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

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


def cu_seqlens_from_lengths(row_doc_lengths: list[list[int]], seq_len: int) -> torch.Tensor:
    """Build cu_seqlens from per-row document lengths; each row's remainder becomes a pad doc."""
    bounds = [0]
    for r, lengths in enumerate(row_doc_lengths):
        start = r * seq_len
        pos = start
        for n in lengths:
            if n <= 0:
                raise ValueError(f"document length must be positive, got {n} in row {r}")
            pos += n
            bounds.append(pos)
        if pos - start > seq_len:
            raise ValueError(f"row {r} holds {pos - start} tokens > seq_len {seq_len}")
        if pos < start + seq_len:
            bounds.append(start + seq_len)
    return torch.tensor(bounds, dtype=torch.int32)


@dataclass
class Document:
    """One tokenised sample before packing (all lists have the same length)."""

    input_ids: list[int]
    labels: list[int]  # already shifted: labels[i] is predicted from position i
    loss_task: list[int]
    gen_mask: list[bool]
    und_mask: list[bool]
    images: list[torch.Tensor] = field(default_factory=list)  # und pixels, in slot order
    key: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def batch_from_rows(rows: list[list[Document]], seq_len: int, pad_id: int) -> PackedBatch:
    """Lay documents end to end per row, pad, and build the PackedBatch fields."""
    r = len(rows)
    input_ids = torch.full((r, seq_len), pad_id, dtype=torch.long)
    position_ids = torch.zeros((r, seq_len), dtype=torch.long)
    labels = torch.full((r, seq_len), IGNORE_INDEX, dtype=torch.long)
    loss_task = torch.full((r, seq_len), NO_TASK, dtype=torch.long)
    gen_mask = torch.zeros((r, seq_len), dtype=torch.bool)
    und_mask = torch.zeros((r, seq_len), dtype=torch.bool)
    images: list[torch.Tensor] = []
    keys: list[list[str]] = []
    lengths: list[list[int]] = []
    for i, docs in enumerate(rows):
        pos = 0
        lengths.append([])
        keys.append([])
        for d in docs:
            n = len(d)
            if pos + n > seq_len:
                raise ValueError(f"row {i}: documents need {pos + n} tokens > seq_len {seq_len}")
            sl = slice(pos, pos + n)
            input_ids[i, sl] = torch.tensor(d.input_ids)
            position_ids[i, sl] = torch.arange(n)
            labels[i, sl] = torch.tensor(d.labels)
            loss_task[i, sl] = torch.tensor(d.loss_task)
            gen_mask[i, sl] = torch.tensor(d.gen_mask, dtype=torch.bool)
            und_mask[i, sl] = torch.tensor(d.und_mask, dtype=torch.bool)
            images.extend(d.images)
            lengths[-1].append(n)
            keys[-1].append(d.key)
            pos += n
        if pos < seq_len:
            position_ids[i, pos:] = torch.arange(seq_len - pos)
    cu = cu_seqlens_from_lengths(lengths, seq_len)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu,
        max_seqlen=max_len,
        labels=labels,
        loss_task=loss_task,
        gen_input_mask=gen_mask,
        und_image_mask=und_mask,
        und_pixel_values=torch.stack(images) if images else None,
        meta={"keys": keys},
    )
