"""The LLaMA-style decoder every Janus model is built on (DeepSeek-LLM): RMSNorm, RoPE,
SwiGLU MLP, no biases. Embeddings in, final-normed hidden states out; the heads belong to the
model family. Attention over packed rows goes through `models/attention.py`; a KV cache
serves incremental decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from janus_train.models.attention import PackedDocs, cached_attention, packed_attention

# Activation recomputation of the LLM blocks (LanguageModel.apply_recompute).
RECOMPUTE_MODES = ("none", "full", "selective")


@dataclass
class LLMConfig:
    """LLaMA-style decoder (DeepSeek-LLM): RMSNorm, RoPE, SwiGLU, no biases."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 16384
    # Janus-Pro ships a separate lm_head; kept as an option for checkpoints that tie it.
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def llm_config_from_llama(lang: dict) -> LLMConfig:
    """Our LLMConfig from a transformers LlamaConfig dict (DeepSeek releases' `language_config`)."""
    return LLMConfig(
        vocab_size=lang["vocab_size"],
        hidden_size=lang["hidden_size"],
        intermediate_size=lang["intermediate_size"],
        num_layers=lang["num_hidden_layers"],
        num_heads=lang["num_attention_heads"],
        num_kv_heads=lang.get("num_key_value_heads") or lang["num_attention_heads"],
        rms_norm_eps=lang.get("rms_norm_eps", 1e-6),
        rope_theta=float(lang.get("rope_theta", 10000.0)),
        max_position_embeddings=lang.get("max_position_embeddings", 16384),
        tie_word_embeddings=bool(lang.get("tie_word_embeddings", False)),
    )


def llama_config_from_llm(llm: LLMConfig) -> dict:
    """The LlamaConfig dict of our LLMConfig (the inverse of `llm_config_from_llama`)."""
    return {
        "model_type": "llama",
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "max_position_embeddings": llm.max_position_embeddings,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
    }



class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as the released model), then cast back before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [R, 1, S, head_dim] for positions [R, S] (computed in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, n = self.length, k.shape[2]
        if start + n > self.max_len:
            raise ValueError(f"KV cache overflow: {start + n} > max_len {self.max_len}")
        self.k[layer][:, :, start : start + n] = k
        self.v[layer][:, :, start : start + n] = v
        return self.k[layer][:, :, : start + n], self.v[layer][:, :, : start + n]

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (the next update overwrites their slots): a
        cached prefix stays while what follows it is recomputed (flow sampling's Euler steps)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a KV cache of length {self.length} to {length}")
        self.length = length


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, docs: PackedDocs | None, backend: str, cache: KVCache | None = None, layer: int = 0):
        r, s, _ = x.shape
        # Head counts come from the projection widths so tensor-parallel shards (which hold a
        # slice of the heads) run this same code.
        q = self.q_proj(x).view(r, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(r, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(r, s, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
            out = cached_attention(q, k, v, backend)
        else:
            out = packed_attention(q, k, v, docs, backend)
        return self.o_proj(out.transpose(1, 2).reshape(r, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        # Set by LanguageModel.apply_recompute: "none" | "full" | "attn".
        self.recompute_mode = "none"

    def _attn_part(self, x, cos, sin, docs, backend, cache, layer):
        return self.attn(self.attn_norm(x), cos, sin, docs, backend, cache, layer)

    def forward(self, x, cos, sin, docs, backend, cache=None, layer=0):
        if self.recompute_mode == "full" and self.training and cache is None:
            return checkpoint(self._forward, x, cos, sin, docs, backend, use_reentrant=False)
        return self._forward(x, cos, sin, docs, backend, cache, layer)

    def _forward(self, x, cos, sin, docs, backend, cache=None, layer=0):
        if self.recompute_mode == "attn" and self.training and cache is None:
            h = checkpoint(self._attn_part, x, cos, sin, docs, backend, None, layer, use_reentrant=False)
        else:
            h = self._attn_part(x, cos, sin, docs, backend, cache, layer)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    """Decoder stack without heads: embeddings in, final-normed hidden states out."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def apply_recompute(self, mode: str, every: int = 2) -> None:
        """Recompute LLM block activations in backward instead of keeping them.

        none       keep everything.
        full       every block: keep only its input, recompute the whole block.
        selective  every >= 2: full recomputation of every `every`-th block (0, every, ...);
                   every == 1: every block recomputes its attention half only (norm, q/k/v,
                   RoPE, attention, o_proj) and keeps its MLP activations.
        """
        if every < 1:
            raise ValueError(f"recompute_every={every} must be >= 1")
        for i, layer in enumerate(self.layers):
            if mode == "full":
                layer.recompute_mode = "full"
            elif mode == "selective" and every == 1:
                layer.recompute_mode = "attn"
            elif mode == "selective":
                layer.recompute_mode = "full" if i % every == 0 else "none"
            elif mode == "none":
                layer.recompute_mode = "none"
            else:
                raise ValueError(f"recompute={mode!r} is not one of none|full|selective")

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        docs: PackedDocs | None,
        backend: str,
        cache: KVCache | None = None,
        capture_layer: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Final-normed hidden states; with `capture_layer=k` also block k's raw output (1-based),
        for losses on intermediate features (JanusFlow's representation alignment)."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        captured = None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, docs, backend, cache, i)
            if capture_layer == i + 1:
                captured = x
        if cache is not None:
            cache.length += inputs_embeds.shape[1]
        return self.norm(x) if capture_layer is None else (self.norm(x), captured)

    # ---- incremental decoding (inference; every model family's `new_cache` / `decode_step`) ----
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` positions, on the weights' device and dtype."""
        p, c = self.embed_tokens.weight, self.cfg
        return KVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, p.device, p.dtype)

    def decode_step(self, inputs_embeds: torch.Tensor, cache: KVCache, backend: str,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run new positions [B, T, H] through the decoder with the cache; hidden [B, T, H]. Their
        positions continue the cache's (cache.length, ...) unless `position_ids` [B, T] are given."""
        b, t, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(cache.length, cache.length + t, device=inputs_embeds.device)[None].expand(b, t)
        return self(inputs_embeds, position_ids, None, backend, cache=cache)
