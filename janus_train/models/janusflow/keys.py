"""JanusFlow's state-dict table: native keys <-> DeepSeek's release (`deepseek`,
MultiModalityCausalLM of `janus/janusflow/models/modeling_vlm.py`). transformers has no JanusFlow,
so the release layout is the one external format.

    native                      deepseek
    llm.*                       language_model.model.*
    lm_head.weight              language_model.lm_head.weight
    vision.*                    vision_und_enc_model.vision_tower.* (timm naming, fused qkv)
    und_aligner.layers.0        vision_und_enc_aligner
    und_begin                   beg_of_und_embed
    gen_encoder.*               vision_gen_enc_model.*
    gen_enc_aligner             vision_gen_enc_aligner
    gen_dec_norm / _aligner     vision_gen_dec_aligner_norm / vision_gen_dec_aligner
    gen_decoder.*               vision_gen_dec_model.*
    repa_proj.*                 (training only: not in the release; kept fresh on import)
"""

from __future__ import annotations

import torch

from janus_train.models.janusflow.config import TRAINING_ONLY, JanusFlowConfig
from janus_train.models.state_dict import KeyTable, check_native, llama_rows, rule, siglip_rows

FORMATS = ("deepseek",)

TABLE = KeyTable(
    formats=FORMATS,
    rules=[
        *llama_rows("llm", deepseek="language_model.model"),
        rule(r"lm_head\.weight", deepseek="language_model.lm_head.weight"),
        *siglip_rows("vision", timm={"deepseek": "vision_und_enc_model.vision_tower"}),
        rule(r"und_aligner\.layers\.0\.(weight|bias)", deepseek=r"vision_und_enc_aligner.\1"),
        rule(r"und_begin", deepseek="beg_of_und_embed"),
        # Our encoder/decoder keep the release's module names below these prefixes (uvit.py).
        rule(r"gen_encoder\.(.+)", deepseek=r"vision_gen_enc_model.\1"),
        rule(r"gen_decoder\.(.+)", deepseek=r"vision_gen_dec_model.\1"),
        rule(r"gen_enc_aligner\.(weight|bias)", deepseek=r"vision_gen_enc_aligner.\1"),
        rule(r"gen_dec_norm\.weight", deepseek="vision_gen_dec_aligner_norm.weight"),
        rule(r"gen_dec_aligner\.(weight|bias)", deepseek=r"vision_gen_dec_aligner.\1"),
    ],
    # The SigLIP attention-pool head is not used for understanding (the patch grid is).
    ignored={"deepseek": [r"vision_und_enc_model\.vision_tower\.attn_pool\..*"]},
)


def native_shapes(cfg: JanusFlowConfig, with_training_only: bool = True) -> dict[str, tuple[int, ...]]:
    """Every native state-dict key and its shape, from a model built on the meta device (a tied
    lm_head is stored once, as the embedding)."""
    from janus_train.models.janusflow.model import JanusFlowModel

    with torch.device("meta"):
        model = JanusFlowModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.llm.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    if not with_training_only:
        shapes = {k: s for k, s in shapes.items() if k.split(".")[0] not in TRAINING_ONLY}
    return shapes


def _native_shapes_of(sd: dict[str, torch.Tensor], cfg: JanusFlowConfig) -> dict[str, tuple[int, ...]]:
    """The shapes a native state dict must have: with the training-only parts if it has any of
    them (then all), without them otherwise (a model converted from the release)."""
    has = any(k.split(".")[0] in TRAINING_ONLY for k in sd)
    return native_shapes(cfg, with_training_only=has)


def to_native(external: dict[str, torch.Tensor], cfg: JanusFlowConfig, fmt: str) -> dict[str, torch.Tensor]:
    """An external (or native) state dict -> a checked native one. From the release, the
    training-only parts are absent (the caller keeps their fresh initialisation)."""
    if fmt == "native":
        return check_native(dict(external), _native_shapes_of(external, cfg))
    return TABLE.to_native(external, native_shapes(cfg, with_training_only=False), fmt)


def from_native(native: dict[str, torch.Tensor], cfg: JanusFlowConfig, fmt: str) -> dict[str, torch.Tensor]:
    """A native state dict -> the external (or native) one, checked first; the release format
    drops the training-only parts."""
    native = {k: v for k, v in native.items() if not (cfg.llm.tie_word_embeddings and k == "lm_head.weight")}
    check_native(native, _native_shapes_of(native, cfg))
    if fmt == "native":
        return dict(native)
    kept = {k: v for k, v in native.items() if k.split(".")[0] not in TRAINING_ONLY}
    return TABLE.from_native(kept, native_shapes(cfg, with_training_only=False), fmt)
