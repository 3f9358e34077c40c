"""State-dict conversion as data: one table of key rules, a column per external format.

A rule matches native keys (a regular expression over our parameter names) and says, per
format, where that tensor lives in the external checkpoint: a template (`\\1` refers to the
native match's groups) or a function of the match returning a `Ref` when the tensor is a slice
of a fused one or carries an extra leading dimension. `KeyTable` expands the rules for one
model's keys and converts whole state dicts both ways, checking every key and shape before
it returns anything: a bad checkpoint fails with the key and both shapes.

The rows of the components the model families share (the LLaMA decoder, SigLIP, the MLP
aligners) are built here, each family adding its own rows beside them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Ref:
    """Where a native tensor lives in an external checkpoint."""

    key: str
    chunk: int | None = None  # this tensor is torch.chunk(external, chunks, dim=0)[chunk]
    chunks: int = 1
    leading_one: bool = False  # the external tensor has an extra leading dim of size 1


Target = "str | Callable[[re.Match], Ref] | None"


@dataclass(frozen=True)
class KeyRule:
    """Native key pattern -> per-format external location (None: the format lacks it)."""

    native: str
    targets: dict[str, Target]


def rule(native: str, **targets: Target) -> KeyRule:
    return KeyRule(native, targets)


@dataclass
class KeyTable:
    """The conversion table of one model family.

    `formats`: the external formats (columns). `ignored`: external keys per format that carry
    nothing we use (training statistics, dropped heads). Shapes come from the caller (a meta
    model of the config), so the table itself holds no sizes.
    """

    formats: tuple[str, ...]
    rules: list[KeyRule]
    ignored: dict[str, list[str]] = field(default_factory=dict)

    def map_key(self, native_key: str, fmt: str) -> Ref:
        self._check_format(fmt)
        for r in self.rules:
            m = re.fullmatch(r.native, native_key)
            if m:
                target = r.targets.get(fmt)
                if target is None:
                    break
                return target(m) if callable(target) else Ref(m.expand(target))
        raise KeyError(f"no {fmt} mapping for native key {native_key!r}")

    def key_map(self, native_keys, fmt: str) -> dict[str, Ref]:
        return {k: self.map_key(k, fmt) for k in native_keys}

    def _check_format(self, fmt: str) -> None:
        if fmt not in self.formats:
            raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {list(self.formats)}")

    def to_native(
        self, external: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], fmt: str, extra_ignored: tuple[str, ...] = ()
    ) -> dict[str, torch.Tensor]:
        """External state dict -> native one. Checks everything before returning anything."""
        kmap = self.key_map(shapes, fmt)
        missing = sorted({ref.key for ref in kmap.values() if ref.key not in external})
        if missing:
            raise KeyError(f"{fmt} checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
        used = {ref.key for ref in kmap.values()}
        ignored = [re.compile(p) for p in (*self.ignored.get(fmt, ()), *extra_ignored)]
        unexpected = sorted(k for k in external if k not in used and not any(p.fullmatch(k) for p in ignored))
        if unexpected:
            raise KeyError(f"{fmt} checkpoint has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
        out: dict[str, torch.Tensor] = {}
        for key, ref in kmap.items():
            t = external[ref.key]
            if ref.leading_one:
                if t.dim() == 0 or t.shape[0] != 1:
                    raise ValueError(f"{fmt} tensor {ref.key!r} has shape {tuple(t.shape)}; expected a leading dim of 1")
                t = t[0]
            if ref.chunk is not None:
                if t.shape[0] % ref.chunks:
                    raise ValueError(f"{fmt} tensor {ref.key!r} with shape {tuple(t.shape)} cannot be split in {ref.chunks}")
                t = torch.chunk(t, ref.chunks, dim=0)[ref.chunk]
            if tuple(t.shape) != shapes[key]:
                raise ValueError(
                    f"shape mismatch for {fmt} tensor {ref.key!r} (native {key!r}): checkpoint has "
                    f"{tuple(t.shape)}, model expects {shapes[key]}"
                )
            out[key] = t.contiguous()
        return out

    def from_native(self, native: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], fmt: str) -> dict[str, torch.Tensor]:
        """Native state dict (checked against `shapes`) -> external one; split tensors are re-fused."""
        check_native(native, shapes)
        kmap = self.key_map(shapes, fmt)
        out: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[int, torch.Tensor]] = {}
        for key, ref in kmap.items():
            t = native[key]
            if ref.chunk is not None:
                parts.setdefault(ref.key, {})[ref.chunk] = t
                continue
            out[ref.key] = t[None] if ref.leading_one else t
        for ext_key, chunks in parts.items():
            out[ext_key] = torch.cat([chunks[i] for i in sorted(chunks)], dim=0)
        return out


def check_native(sd: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """`sd` has exactly the keys of `shapes`, each with its shape; raises naming the first misfit."""
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise KeyError(f"native checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    unexpected = sorted(set(sd) - set(shapes))
    if unexpected:
        raise KeyError(f"native checkpoint has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
    for k, t in sd.items():
        if tuple(t.shape) != shapes[k]:
            raise ValueError(f"shape mismatch for native tensor {k!r}: checkpoint has {tuple(t.shape)}, model expects {shapes[k]}")
    return sd


# ---------------------------------------------------------------------------------------
# Rows of the shared components
# ---------------------------------------------------------------------------------------


def llama_rows(native: str, **prefixes: str) -> list[KeyRule]:
    """Our LanguageModel under `native` vs transformers' LlamaModel naming under each
    format's prefix (the same names in every Llama checkpoint)."""
    layer = [
        (r"attn_norm\.weight", "input_layernorm.weight"),
        (r"attn\.(q|k|v|o)_proj\.weight", r"self_attn.\2_proj.weight"),
        (r"mlp_norm\.weight", "post_attention_layernorm.weight"),
        (r"mlp\.(gate|up|down)_proj\.weight", r"mlp.\2_proj.weight"),
    ]
    n = re.escape(native)
    rows = [
        rule(rf"{n}\.embed_tokens\.weight", **{f: f"{p}.embed_tokens.weight" for f, p in prefixes.items()}),
        rule(rf"{n}\.norm\.weight", **{f: f"{p}.norm.weight" for f, p in prefixes.items()}),
    ]
    for ours, theirs in layer:
        rows.append(rule(rf"{n}\.layers\.(\d+)\." + ours, **{f: p + r".layers.\1." + theirs for f, p in prefixes.items()}))
    return rows


def _fused_qkv(prefix: str) -> Callable[[re.Match], Ref]:
    # timm's ViT (DeepSeek's SigLIP) fuses q, k and v into one `qkv` linear.
    def target(m: re.Match) -> Ref:
        return Ref(f"{prefix}.blocks.{m.group(1)}.attn.qkv.{m.group(3)}", chunk="qkv".index(m.group(2)), chunks=3)

    return target


def siglip_rows(native: str, hf: str | None = None, timm: dict[str, str] | None = None) -> list[KeyRule]:
    """Our SigLIPVisionTower under `native`: transformers' Janus vision model under the `hf`
    prefix, and timm's VisionTransformer (DeepSeek's releases) under a prefix per format
    (`timm={"deepseek": "vision_model.vision_tower"}`)."""
    timm = timm or {}
    n = re.escape(native)

    def cols(hf_key: str | None, timm_key: "str | Callable[[str], Target]") -> dict[str, Target]:
        out: dict[str, Target] = {}
        if hf is not None and hf_key is not None:
            out["hf"] = f"{hf}.{hf_key}"
        for fmt, prefix in timm.items():
            out[fmt] = timm_key(prefix) if callable(timm_key) else f"{prefix}.{timm_key}"
        return out

    return [
        rule(rf"{n}\.patch_embed\.(weight|bias)", **cols(r"embeddings.patch_embedding.\1", r"patch_embed.proj.\1")),
        rule(rf"{n}\.pos_embed", **cols("embeddings.position_embedding.weight", lambda p: (lambda m: Ref(f"{p}.pos_embed", leading_one=True)))),
        rule(rf"{n}\.blocks\.(\d+)\.norm(1|2)\.(weight|bias)", **cols(r"encoder.layers.\1.layer_norm\2.\3", r"blocks.\1.norm\2.\3")),
        rule(rf"{n}\.blocks\.(\d+)\.attn\.(q|k|v)_proj\.(weight|bias)", **cols(r"encoder.layers.\1.self_attn.\2_proj.\3", _fused_qkv)),
        rule(rf"{n}\.blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", **cols(r"encoder.layers.\1.self_attn.projection_layer.\2", r"blocks.\1.attn.proj.\2")),
        rule(rf"{n}\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", **cols(r"encoder.layers.\1.mlp.\2.\3", r"blocks.\1.mlp.\2.\3")),
        rule(rf"{n}\.post_norm\.(weight|bias)", **cols(r"post_layernorm.\1", r"norm.\1")),
    ]


def hf_projector(prefix: str) -> Callable[[re.Match], Ref]:
    """transformers names a projector's first linear `fc1` and the rest `hidden_layers.{j-1}`."""

    def target(m: re.Match) -> Ref:
        j = int(m.group(1))
        return Ref(f"{prefix}.{'fc1' if j == 0 else f'hidden_layers.{j - 1}'}.{m.group(2)}")

    return target


def sequential_projector(prefix: str) -> Callable[[re.Match], Ref]:
    """DeepSeek's projectors are nn.Sequential(Linear, GELU, Linear, ...): linears at even indices."""
    return lambda m: Ref(f"{prefix}.layers.{int(m.group(1)) * 2}.{m.group(2)}")
