"""Native <-> HF transformers <-> DeepSeek-original state dicts and configs.

Conversion is data: an ordered table of key patterns per format. Each native key is matched
against the table (first full match wins) to get the external key; a few rules also split or
reshape a tensor (DeepSeek fuses SigLIP's q/k/v and stores pos_embed with a leading 1).

`key_map(cfg, fmt)` expands the tables for one config into an explicit
{native key -> Ref(external key, chunk, ...)} dict; `to_native` / `from_native` use it and
check every key and shape first, so a bad checkpoint fails with the key and both shapes
before anything is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from janus_train.models.janus.config import JanusConfig, LLMConfig, VisionConfig, VQConfig

FORMATS = ("native", "hf", "deepseek")


@dataclass(frozen=True)
class Ref:
    """Where a native tensor lives in an external checkpoint."""

    key: str
    chunk: int | None = None  # this tensor is torch.chunk(external, chunks, dim=0)[chunk]
    chunks: int = 1
    leading_one: bool = False  # external tensor has an extra leading dim of size 1


Rule = tuple[str, "str | Callable[[re.Match], Ref]"]


def _shift(group: str, delta: int = 0, scale: int = 1) -> str:
    return str(int(group) * scale + delta)


def _aligner_hf(prefix: str) -> Callable[[re.Match], Ref]:
    # HF names the first projector layer fc1 and the rest hidden_layers.{j-1}.
    def rule(m: re.Match) -> Ref:
        j = int(m.group(1))
        name = "fc1" if j == 0 else f"hidden_layers.{j - 1}"
        return Ref(f"{prefix}.{name}.{m.group(2)}")

    return rule


def _aligner_deepseek(prefix: str) -> Callable[[re.Match], Ref]:
    # DeepSeek's projector is nn.Sequential(Linear, GELU, Linear, ...): linears at even indices.
    return lambda m: Ref(f"{prefix}.layers.{_shift(m.group(1), scale=2)}.{m.group(2)}")


def _qkv_deepseek(m: re.Match) -> Ref:
    which = "qkv".index(m.group(2))
    return Ref(f"vision_model.vision_tower.blocks.{m.group(1)}.attn.qkv.{m.group(3)}", chunk=which, chunks=3)


_LLAMA_LAYER = [
    (r"attn_norm\.weight", "input_layernorm.weight"),
    (r"attn\.(q|k|v|o)_proj\.weight", r"self_attn.\1_proj.weight"),
    (r"mlp_norm\.weight", "post_attention_layernorm.weight"),
    (r"mlp\.(gate|up|down)_proj\.weight", r"mlp.\1_proj.weight"),
]


def _llm_rules(prefix: str) -> list[Rule]:
    rules: list[Rule] = [(r"llm\.embed_tokens\.weight", f"{prefix}.embed_tokens.weight"), (r"llm\.norm\.weight", f"{prefix}.norm.weight")]
    for ours, theirs in _LLAMA_LAYER:
        rules.append((r"llm\.layers\.(\d+)\." + ours, prefix + r".layers.\1." + theirs.replace(r"\1", r"\2")))
    return rules


def _vq_rules(prefix: str, enc_level: str, dec_level: str, block: str, mid: tuple[str, str, str], codebook: str) -> list[Rule]:
    """VQ keys: our levels/blocks/attns/resample vs the external level and block names."""
    mid1, mid_attn, mid2 = mid
    levels = {"encoder": enc_level, "decoder": dec_level}

    def level_rule(suffix: str) -> Callable[[re.Match], Ref]:
        def rule(m: re.Match) -> Ref:
            part, lvl = m.group(1), m.group(2)
            rest = suffix.format(*m.groups()[2:])
            return Ref(f"{prefix}.{part}.{levels[part]}.{lvl}.{rest}")

        return rule

    return [
        (r"vq\.(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", prefix + r".\1.\2.\3"),
        (r"vq\.(encoder|decoder)\.mid\.block1\.(.+)", prefix + r".\1.mid." + mid1 + r".\2"),
        (r"vq\.(encoder|decoder)\.mid\.attn\.(.+)", prefix + r".\1.mid." + mid_attn + r".\2"),
        (r"vq\.(encoder|decoder)\.mid\.block2\.(.+)", prefix + r".\1.mid." + mid2 + r".\2"),
        (r"vq\.(encoder)\.levels\.(\d+)\.resample\.(.+)", level_rule("downsample.{0}")),
        (r"vq\.(decoder)\.levels\.(\d+)\.resample\.(.+)", level_rule("upsample.{0}")),
        (r"vq\.(encoder|decoder)\.levels\.(\d+)\.blocks\.(\d+)\.shortcut\.(.+)", level_rule(block + ".{0}.nin_shortcut.{1}")),
        (r"vq\.(encoder|decoder)\.levels\.(\d+)\.blocks\.(\d+)\.(.+)", level_rule(block + ".{0}.{1}")),
        (r"vq\.(encoder|decoder)\.levels\.(\d+)\.attns\.(\d+)\.(.+)", level_rule("attn.{0}.{1}")),
        (r"vq\.(quant_conv|post_quant_conv)\.(weight|bias)", prefix + r".\1.\2"),
        (r"vq\.codebook\.weight", codebook),
    ]


HF_RULES: list[Rule] = [
    *_llm_rules("model.language_model"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"vision\.patch_embed\.(weight|bias)", r"model.vision_model.embeddings.patch_embedding.\1"),
    (r"vision\.pos_embed", "model.vision_model.embeddings.position_embedding.weight"),
    (r"vision\.blocks\.(\d+)\.norm(1|2)\.(weight|bias)", r"model.vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"vision\.blocks\.(\d+)\.attn\.(q|k|v)_proj\.(weight|bias)", r"model.vision_model.encoder.layers.\1.self_attn.\2_proj.\3"),
    (r"vision\.blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"model.vision_model.encoder.layers.\1.self_attn.projection_layer.\2"),
    (r"vision\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"model.vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"vision\.post_norm\.(weight|bias)", r"model.vision_model.post_layernorm.\1"),
    (r"und_aligner\.layers\.(\d+)\.(weight|bias)", _aligner_hf("model.aligner")),
    (r"gen_aligner\.layers\.(\d+)\.(weight|bias)", _aligner_hf("model.generation_aligner")),
    (r"gen_embed\.weight", "model.generation_embeddings.weight"),
    (r"gen_head\.fc1\.(weight|bias)", r"model.generation_head.proj_out.\1"),
    (r"gen_head\.fc2\.(weight|bias)", r"model.generation_head.vision_head.\1"),
    *_vq_rules(
        "model.vqmodel",
        enc_level="down",
        dec_level="up",
        block="block",
        mid=("block_1", "attn_1", "block_2"),
        codebook="model.vqmodel.quantize.embedding.weight",
    ),
]

DEEPSEEK_RULES: list[Rule] = [
    *_llm_rules("language_model.model"),
    (r"lm_head\.weight", "language_model.lm_head.weight"),
    (r"vision\.patch_embed\.(weight|bias)", r"vision_model.vision_tower.patch_embed.proj.\1"),
    (r"vision\.pos_embed", lambda m: Ref("vision_model.vision_tower.pos_embed", leading_one=True)),
    (r"vision\.blocks\.(\d+)\.norm(1|2)\.(weight|bias)", r"vision_model.vision_tower.blocks.\1.norm\2.\3"),
    (r"vision\.blocks\.(\d+)\.attn\.(q|k|v)_proj\.(weight|bias)", _qkv_deepseek),
    (r"vision\.blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"vision_model.vision_tower.blocks.\1.attn.proj.\2"),
    (r"vision\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.vision_tower.blocks.\1.mlp.\2.\3"),
    (r"vision\.post_norm\.(weight|bias)", r"vision_model.vision_tower.norm.\1"),
    (r"und_aligner\.layers\.(\d+)\.(weight|bias)", _aligner_deepseek("aligner")),
    (r"gen_aligner\.layers\.(\d+)\.(weight|bias)", _aligner_deepseek("gen_aligner")),
    (r"gen_embed\.weight", "gen_embed.weight"),
    (r"gen_head\.fc1\.(weight|bias)", r"gen_head.output_mlp_projector.\1"),
    (r"gen_head\.fc2\.(weight|bias)", r"gen_head.vision_head.\1"),
    *_vq_rules(
        "gen_vision_model",
        enc_level="conv_blocks",
        dec_level="conv_blocks",
        block="res",
        mid=("0", "1", "2"),
        codebook="gen_vision_model.quantize.embedding.weight",
    ),
]

# External keys that carry no weights we use (training-time statistics, dropped heads).
IGNORED_EXTERNAL = {
    "hf": [],
    "deepseek": [r"vision_model\.vision_tower\.attn_pool\..*", r"gen_vision_model\.quantize\.codebook_used"],
}


RULES = {"hf": HF_RULES, "deepseek": DEEPSEEK_RULES}


def map_key(native_key: str, fmt: str) -> Ref:
    for pattern, repl in RULES[fmt]:
        m = re.fullmatch(pattern, native_key)
        if m:
            return repl(m) if callable(repl) else Ref(m.expand(repl))
    raise KeyError(f"no {fmt} mapping for native key {native_key!r}")


def native_shapes(cfg: JanusConfig) -> dict[str, tuple[int, ...]]:
    """Every native state-dict key and its shape, from a model built on the meta device."""
    from janus_train.models.janus.model import JanusModel

    with torch.device("meta"):
        model = JanusModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.llm.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def key_map(cfg: JanusConfig, fmt: str) -> dict[str, Ref]:
    if fmt not in RULES:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {sorted(RULES)}")
    return {k: map_key(k, fmt) for k in native_shapes(cfg)}


def to_native(external: dict[str, torch.Tensor], cfg: JanusConfig, fmt: str) -> dict[str, torch.Tensor]:
    """External state dict -> native one. Checks everything before returning anything."""
    if fmt == "native":
        return _check_native(external, cfg)
    shapes = native_shapes(cfg)
    kmap = key_map(cfg, fmt)
    missing = sorted({ref.key for ref in kmap.values() if ref.key not in external})
    if missing:
        raise KeyError(f"{fmt} checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    used = {ref.key for ref in kmap.values()}
    ignored = [re.compile(p) for p in IGNORED_EXTERNAL[fmt]]
    if fmt == "hf" and cfg.llm.tie_word_embeddings:
        ignored.append(re.compile(r"lm_head\.weight"))
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


def from_native(native: dict[str, torch.Tensor], cfg: JanusConfig, fmt: str) -> dict[str, torch.Tensor]:
    """Native state dict -> external one (split tensors are re-fused)."""
    native = _check_native(native, cfg)
    if fmt == "native":
        return dict(native)
    kmap = key_map(cfg, fmt)
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


def _check_native(sd: dict[str, torch.Tensor], cfg: JanusConfig) -> dict[str, torch.Tensor]:
    shapes = native_shapes(cfg)
    sd = {k: v for k, v in sd.items() if not (cfg.llm.tie_word_embeddings and k == "lm_head.weight")}
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
# Configs
# ---------------------------------------------------------------------------------------


def config_to_hf(cfg: JanusConfig) -> dict[str, Any]:
    """A transformers `JanusConfig` dict for this model."""
    if cfg.gen_head_hidden != cfg.llm.hidden_size:
        raise ValueError(
            f"HF Janus ties the gen head width to the LLM width: vq.gen_head_hidden={cfg.gen_head_hidden} "
            f"!= llm.hidden_size={cfg.llm.hidden_size}"
        )
    llm, vis, vq = cfg.llm, cfg.vision, cfg.vq
    return {
        "model_type": "janus",
        "architectures": ["JanusForConditionalGeneration"],
        "image_token_id": cfg.image_token_id if cfg.image_token_id is not None else 100581,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "text_config": {
            "model_type": "llama",
            "vocab_size": llm.vocab_size,
            "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_layers,
            "num_attention_heads": llm.num_heads,
            "num_key_value_heads": llm.num_kv_heads,
            "rms_norm_eps": llm.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": llm.rope_theta},
            "max_position_embeddings": llm.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": llm.tie_word_embeddings,
        },
        "vision_config": {
            "model_type": "janus_vision_model",
            "hidden_size": vis.hidden_size,
            "num_hidden_layers": vis.num_layers,
            "num_attention_heads": vis.num_heads,
            "image_size": vis.image_size,
            "patch_size": vis.patch_size,
            "num_channels": vis.num_channels,
            "mlp_ratio": vis.mlp_ratio,
            "layer_norm_eps": vis.layer_norm_eps,
            "projection_dim": llm.hidden_size,
            "depth": vis.aligner_depth,
            "num_image_tokens": cfg.num_image_tokens,
            "hidden_act": "gelu",
            "attention_bias": True,
            "use_qk_norm": False,
        },
        "vq_config": {
            "model_type": "janus_vqgan",
            "embed_dim": vq.code_dim,
            "num_embeddings": vq.codebook_size,
            "base_channels": vq.base_channels,
            "channel_multiplier": list(vq.channel_multipliers),
            "num_res_blocks": vq.num_res_blocks,
            "latent_channels": vq.latent_channels,
            "in_channels": vq.in_channels,
            "out_channels": vq.out_channels,
            "projection_dim": llm.hidden_size,
            "num_hidden_layers": vq.gen_aligner_depth,
            "image_token_embed_dim": llm.hidden_size,
            "num_patches": cfg.gen_grid,
            "hidden_act": "gelu",
        },
    }


def config_from_hf(d: dict[str, Any], name: str = "from_hf") -> JanusConfig:
    """Our config from a transformers Janus config.json dict (missing fields: HF defaults)."""
    from transformers import JanusConfig as HFJanusConfig

    hf = HFJanusConfig(**{k: v for k, v in d.items() if k in ("text_config", "vision_config", "vq_config", "image_token_id", "tie_word_embeddings")})
    t, v, q = hf.text_config, hf.vision_config, hf.vq_config
    if getattr(v, "use_qk_norm", False):
        raise ValueError("HF vision_config.use_qk_norm=True is not supported (Janus-Pro does not use it)")
    if q.double_latent:
        raise ValueError("HF vq_config.double_latent=True is not supported (Janus-Pro does not use it)")
    if v.projection_dim != t.hidden_size or q.projection_dim != t.hidden_size or q.image_token_embed_dim != t.hidden_size:
        raise ValueError(
            f"HF config projection dims (vision {v.projection_dim}, vq {q.projection_dim}, head input "
            f"{q.image_token_embed_dim}) must equal text hidden_size {t.hidden_size}"
        )
    rope = getattr(t, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"HF text_config rope_type={rope.get('rope_type')!r} is not supported (only 'default')")
    tied = bool(d.get("tie_word_embeddings", getattr(t, "tie_word_embeddings", False)))
    return JanusConfig(
        name=name,
        llm=LLMConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_layers=t.num_hidden_layers,
            num_heads=t.num_attention_heads,
            num_kv_heads=t.num_key_value_heads or t.num_attention_heads,
            rms_norm_eps=t.rms_norm_eps,
            rope_theta=float(theta),
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=tied,
        ),
        vision=VisionConfig(
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_size=v.hidden_size,
            num_layers=v.num_hidden_layers,
            num_heads=v.num_attention_heads,
            mlp_ratio=v.mlp_ratio,
            layer_norm_eps=v.layer_norm_eps,
            num_channels=v.num_channels,
            aligner_depth=v.depth,
        ),
        vq=VQConfig(
            codebook_size=q.num_embeddings,
            code_dim=q.embed_dim,
            base_channels=q.base_channels,
            channel_multipliers=tuple(q.channel_multiplier),
            num_res_blocks=q.num_res_blocks,
            latent_channels=q.latent_channels,
            in_channels=q.in_channels,
            out_channels=q.out_channels,
            gen_aligner_depth=q.num_hidden_layers,
        ),
        image_token_id=hf.image_token_id,
    ).validate()


# SigLIP sizes the DeepSeek release names by model_name instead of listing them.
_DEEPSEEK_VISION_MODELS = {
    "siglip_large_patch16_384": dict(hidden_size=1024, num_layers=24, num_heads=16, patch_size=16, mlp_ratio=4.0),
}
# LlamaGen's "VQ-16" (the only tokenizer Janus-Pro ships).
_DEEPSEEK_VQ_MODELS = {
    "VQ-16": dict(base_channels=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2, latent_channels=256),
}


def config_from_deepseek(d: dict[str, Any], name: str = "from_deepseek") -> JanusConfig:
    """Our config from DeepSeek's original config.json (language_config, vision_config, ...).

    For checkpoints at non-release sizes (our tiny test models), `vision_config.params` and
    `gen_vision_config.params` may carry an explicit `janus_train_sizes` dict; the release
    files name their architecture instead (`model_name`, `cls`).
    """
    try:
        lang = d["language_config"]
        vparams = d["vision_config"]["params"]
        aparams = d["aligner_config"]["params"]
        gvis = d["gen_vision_config"]
        gparams = gvis["params"]
        galign = d["gen_aligner_config"]["params"]
        ghead = d["gen_head_config"]["params"]
    except KeyError as e:
        raise ValueError(f"DeepSeek config.json lacks key {e}") from None
    vsizes = vparams.get("janus_train_sizes") or _DEEPSEEK_VISION_MODELS.get(vparams.get("model_name", ""))
    if vsizes is None:
        raise ValueError(f"unknown DeepSeek vision model_name {vparams.get('model_name')!r}")
    qsizes = gparams.get("janus_train_sizes") or _DEEPSEEK_VQ_MODELS.get(gvis.get("cls", ""))
    if qsizes is None:
        raise ValueError(f"unknown DeepSeek gen_vision_config cls {gvis.get('cls')!r}")
    if aparams.get("projector_type", "mlp_gelu") != "mlp_gelu" or galign.get("projector_type", "mlp_gelu") != "mlp_gelu":
        raise ValueError("only mlp_gelu projectors are supported")
    hidden = lang["hidden_size"]
    for key, val in (("aligner n_embed", aparams["n_embed"]), ("gen_aligner n_embed", galign["n_embed"]), ("gen_head n_embed", ghead["n_embed"])):
        if val != hidden:
            raise ValueError(f"DeepSeek {key}={val} != language hidden_size={hidden}")
    if ghead["image_token_size"] != gparams["image_token_size"]:
        raise ValueError("DeepSeek gen_head image_token_size != gen_vision image_token_size")
    return JanusConfig(
        name=name,
        llm=LLMConfig(
            vocab_size=lang["vocab_size"],
            hidden_size=hidden,
            intermediate_size=lang["intermediate_size"],
            num_layers=lang["num_hidden_layers"],
            num_heads=lang["num_attention_heads"],
            num_kv_heads=lang.get("num_key_value_heads") or lang["num_attention_heads"],
            rms_norm_eps=lang.get("rms_norm_eps", 1e-6),
            rope_theta=float(lang.get("rope_theta", 10000.0)),
            max_position_embeddings=lang.get("max_position_embeddings", 16384),
            tie_word_embeddings=bool(lang.get("tie_word_embeddings", False)),
        ),
        vision=VisionConfig(image_size=vparams.get("image_size", 384), aligner_depth=aparams.get("depth", 2), **vsizes),
        vq=VQConfig(
            codebook_size=gparams["image_token_size"],
            code_dim=gparams["n_embed"],
            gen_aligner_depth=galign.get("depth", 2),
            gen_head_hidden=ghead["image_token_embed"],
            **{k: tuple(v) if k == "channel_multipliers" else v for k, v in qsizes.items()},
        ),
    ).validate()


def config_to_deepseek(cfg: JanusConfig) -> dict[str, Any]:
    """DeepSeek-layout config.json (used to write test checkpoints in the original layout)."""
    llm, vis, vq = cfg.llm, cfg.vision, cfg.vq
    vsizes = dict(hidden_size=vis.hidden_size, num_layers=vis.num_layers, num_heads=vis.num_heads, patch_size=vis.patch_size, mlp_ratio=vis.mlp_ratio)
    qsizes = dict(base_channels=vq.base_channels, channel_multipliers=list(vq.channel_multipliers), num_res_blocks=vq.num_res_blocks, latent_channels=vq.latent_channels)
    release_vision = vsizes == _DEEPSEEK_VISION_MODELS["siglip_large_patch16_384"]
    release_vq = qsizes == {k: list(v) if isinstance(v, tuple) else v for k, v in _DEEPSEEK_VQ_MODELS["VQ-16"].items()}
    vparams: dict[str, Any] = {"image_size": vis.image_size, "model_name": "siglip_large_patch16_384", "select_feature": "same", "select_layer": -1}
    if not release_vision:
        vparams["janus_train_sizes"] = vsizes
    gparams: dict[str, Any] = {"image_token_size": vq.codebook_size, "n_embed": vq.code_dim}
    if not release_vq:
        gparams["janus_train_sizes"] = qsizes
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "language_config": {
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
        },
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": vparams},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": {"depth": vis.aligner_depth, "input_dim": vis.hidden_size, "n_embed": llm.hidden_size, "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": gparams},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner", "params": {"depth": vq.gen_aligner_depth, "input_dim": vq.code_dim, "n_embed": llm.hidden_size, "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {"image_token_embed": cfg.gen_head_hidden, "image_token_size": vq.codebook_size, "n_embed": llm.hidden_size}},
    }
