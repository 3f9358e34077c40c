"""Causal attention over packed rows: every token sees earlier tokens of its own document only.

Backends (`model.attention`):
  flash  flash-attn varlen kernel driven by cu_seqlens (GPU only; falls back to sdpa with one
         warning when flash-attn or a GPU is missing);
  sdpa   torch scaled_dot_product_attention with a boolean block-diagonal causal mask;
  flex   torch flex_attention with a document mask_mod (CPU: forward only, torch has no flex
         backward on CPU);
  eager  explicit softmax(QK^T)V, the readable reference.

All of them build their masking from the same `PackedDocs` (cu_seqlens -> per-token doc ids),
so "no cross-document attention" is one property checked once (tests/parallel/test_attention.py).
Und image tokens attend causally like text tokens, as in the released model.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from janus_train.contracts.batch import doc_ids_from_cu_seqlens

ATTENTION_BACKENDS = ("sdpa", "eager", "flex", "flash")


@dataclass
class PackedDocs:
    """Per-forward attention metadata, built once and shared by every layer."""

    rows: int
    seq_len: int
    cu_seqlens: torch.Tensor  # int32 [D+1] over the flattened rows
    max_seqlen: int
    doc_ids: torch.Tensor  # long [R, S]
    _dense: torch.Tensor | None = None
    _block_mask: object | None = None
    _segments: list[tuple[int, int, int]] | None = None

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int, rows: int, seq_len: int) -> "PackedDocs":
        return cls(rows, seq_len, cu_seqlens.to(torch.int32), int(max_seqlen), doc_ids_from_cu_seqlens(cu_seqlens, rows, seq_len))

    @classmethod
    def single_document_rows(cls, rows: int, seq_len: int, device: torch.device | str = "cpu") -> "PackedDocs":
        cu = torch.arange(0, rows * seq_len + 1, seq_len, dtype=torch.int32, device=device)
        return cls.from_cu_seqlens(cu, seq_len, rows, seq_len)

    def row_segments(self) -> list[tuple[int, int, int]]:
        """(row, start, end) of every document, in row coordinates (host-side, cached)."""
        if self._segments is None:
            cu = self.cu_seqlens.tolist()
            self._segments = [(a // self.seq_len, a % self.seq_len, a % self.seq_len + (b - a)) for a, b in zip(cu[:-1], cu[1:])]
        return self._segments

    def dense_mask(self) -> torch.Tensor:
        """bool [R, 1, S, S]: True where query i may attend key j (same doc and j <= i)."""
        if self._dense is None:
            same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
            idx = torch.arange(self.seq_len, device=self.doc_ids.device)
            causal = idx[None, :, None] >= idx[None, None, :]
            self._dense = (same & causal)[:, None]
        return self._dense

    def block_mask(self):
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.doc_ids

            def mask_mod(b, h, q_idx, kv_idx):
                return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

            self._block_mask = create_block_mask(
                mask_mod, B=self.rows, H=None, Q_LEN=self.seq_len, KV_LEN=self.seq_len, device=str(doc.device)
            )
        return self._block_mask


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal and mask is None:
        sq, sk = q.shape[-2], k.shape[-2]
        idx_q = torch.arange(sk - sq, sk, device=q.device)
        mask = idx_q[:, None] >= torch.arange(sk, device=q.device)[None, :]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


@functools.lru_cache(maxsize=1)
def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


_warned_fallback = False


def resolve_backend(name: str) -> str:
    """The backend that will actually run; `flash` degrades to `sdpa` with one warning."""
    global _warned_fallback
    if name == "flash" and not flash_available():
        if not _warned_fallback:
            warnings.warn("attention=flash requested but flash-attn or a CUDA device is missing; using sdpa", stacklevel=2)
            _warned_fallback = True
        return "sdpa"
    return name


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs, backend: str) -> torch.Tensor:
    """q, k, v: [R, H, S, D] (k/v may have fewer heads: grouped-query). Returns [R, H, S, D]."""
    backend = resolve_backend(backend)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if backend == "sdpa":
        if q.device.type == "cpu" and _by_document_pays(docs, q.shape[1] * q.shape[-1]):
            return _sdpa_by_document(q, k, v, docs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.dense_mask())
    if backend == "eager":
        return _eager(q, k, v, docs.dense_mask(), causal=False)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=docs.block_mask())
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        r, h, s, d = q.shape
        # varlen wants [total_tokens, H, D] with documents back to back.
        qf, kf, vf = (t.transpose(1, 2).reshape(r * s, t.shape[1], d) for t in (q, k, v))
        out = flash_attn_varlen_func(
            qf, kf, vf, docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen, causal=True
        )
        return out.view(r, s, h, d).transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}")


# CPU only: running SDPA document by document (causal, no mask) skips the masked-out blocks
# that a masked call over the whole row computes anyway, but costs a Python-level call per
# document. Worth it when the skipped work per call exceeds this many FLOPs (~0.1 ms of one
# CPU core, a generous bound on a call's overhead). Packed rows of long documents qualify;
# the tiny test model's short rows do not.
BY_DOCUMENT_MIN_SAVED_FLOPS_PER_CALL = 5e6


def _by_document_pays(docs: PackedDocs, width: int) -> bool:
    segments = docs.row_segments()
    dense = docs.rows * docs.seq_len**2
    by_doc = sum((e - s) * (e - s + 1) // 2 for _, s, e in segments)
    # QK^T and AV, forward and backward: ~ 6 * 2 * width FLOPs per score.
    saved = 12.0 * width * (dense - by_doc)
    return saved > BY_DOCUMENT_MIN_SAVED_FLOPS_PER_CALL * len(segments)


def _sdpa_by_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs) -> torch.Tensor:
    """The block-diagonal causal attention of `docs`, one causal SDPA call per document."""
    lengths: list[list[int]] = [[] for _ in range(docs.rows)]
    for r, s, e in docs.row_segments():
        lengths[r].append(e - s)
    rows = []
    # unbind/split rather than slicing: their backward is one stack/cat, where every slice's
    # backward would write its gradient into a fresh zero tensor of the whole input's size.
    for qr, kr, vr, lens in zip(q.unbind(0), k.unbind(0), v.unbind(0), lengths):
        parts = [
            F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=True)
            for qd, kd, vd in zip(qr.split(lens, dim=1), kr.split(lens, dim=1), vr.split(lens, dim=1))
        ]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal attention of the last q.shape[-2] positions over k/v (KV-cache decoding)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    sq, sk = q.shape[-2], k.shape[-2]
    if resolve_backend(backend) == "eager":
        return _eager(q, k, v, None, causal=True)
    if sq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    idx_q = torch.arange(sk - sq, sk, device=q.device)
    mask = idx_q[:, None] >= torch.arange(sk, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
