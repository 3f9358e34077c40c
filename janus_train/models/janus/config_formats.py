"""Janus-Pro's config.json in the external layouts: transformers' `JanusConfig` (`hf`) and
DeepSeek's release (`deepseek`: language_config, vision_config, aligner_config, ...), to and
from our `JanusConfig`. The weights' key tables are in `keys.py`.
"""

from __future__ import annotations

from typing import Any

from janus_train.models.janus.config import JanusConfig, VQConfig
from janus_train.models.llm import LLMConfig, llama_config_from_llm, llm_config_from_llama
from janus_train.models.siglip import VisionConfig, deepseek_vision_params, vision_from_deepseek


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
            # Not a transformers field (its VQ always uses 32 groups); kept so our loader reads
            # back a tiny tokenizer trained with fewer. Written only when it differs.
            **({"norm_groups": vq.norm_groups} if vq.norm_groups != 32 else {}),
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
            norm_groups=int(getattr(q, "norm_groups", 32)),
        ),
        image_token_id=hf.image_token_id,
    ).validate()


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
    qsizes = gparams.get("janus_train_sizes") or _DEEPSEEK_VQ_MODELS.get(gvis.get("cls", ""))
    if qsizes is None:
        raise ValueError(f"unknown DeepSeek gen_vision_config cls {gvis.get('cls')!r}")
    if aparams.get("projector_type", "mlp_gelu") != "mlp_gelu" or galign.get("projector_type", "mlp_gelu") != "mlp_gelu":
        raise ValueError("only mlp_gelu projectors are supported")
    llm = llm_config_from_llama(lang)
    hidden = llm.hidden_size
    for key, val in (("aligner n_embed", aparams["n_embed"]), ("gen_aligner n_embed", galign["n_embed"]), ("gen_head n_embed", ghead["n_embed"])):
        if val != hidden:
            raise ValueError(f"DeepSeek {key}={val} != language hidden_size={hidden}")
    if ghead["image_token_size"] != gparams["image_token_size"]:
        raise ValueError("DeepSeek gen_head image_token_size != gen_vision image_token_size")
    return JanusConfig(
        name=name,
        llm=llm,
        vision=vision_from_deepseek(vparams, aligner_depth=aparams.get("depth", 2)),
        vq=VQConfig(
            codebook_size=gparams["image_token_size"],
            code_dim=gparams["n_embed"],
            gen_aligner_depth=galign.get("depth", 2),
            # The LLM's width is the default (None): one representation per model, so a release
            # and our preset of the same sizes compare equal (training's init_from check).
            gen_head_hidden=None if ghead["image_token_embed"] == llm.hidden_size else ghead["image_token_embed"],
            **{k: tuple(v) if k == "channel_multipliers" else v for k, v in qsizes.items()},
        ),
    ).validate()


def config_to_deepseek(cfg: JanusConfig) -> dict[str, Any]:
    """DeepSeek-layout config.json (used to write test checkpoints in the original layout)."""
    llm, vis, vq = cfg.llm, cfg.vision, cfg.vq
    qsizes = dict(base_channels=vq.base_channels, channel_multipliers=list(vq.channel_multipliers), num_res_blocks=vq.num_res_blocks, latent_channels=vq.latent_channels)
    release_vq = qsizes == {k: list(v) if isinstance(v, tuple) else v for k, v in _DEEPSEEK_VQ_MODELS["VQ-16"].items()}
    if vq.norm_groups != 32:
        qsizes["norm_groups"] = vq.norm_groups
        release_vq = False
    gparams: dict[str, Any] = {"image_token_size": vq.codebook_size, "n_embed": vq.code_dim}
    if not release_vq:
        gparams["janus_train_sizes"] = qsizes
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "language_config": llama_config_from_llm(llm),
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": deepseek_vision_params(vis)},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": {"depth": vis.aligner_depth, "input_dim": vis.hidden_size, "n_embed": llm.hidden_size, "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": gparams},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner", "params": {"depth": vq.gen_aligner_depth, "input_dim": vq.code_dim, "n_embed": llm.hidden_size, "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {"image_token_embed": cfg.gen_head_hidden, "image_token_size": vq.codebook_size, "n_embed": llm.hidden_size}},
    }
