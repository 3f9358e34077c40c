"""Janus-Pro's state-dict table: native keys <-> transformers (`hf`) <-> DeepSeek's release
(`deepseek`), one row per parameter family, one column per format.

    native                          hf (JanusForConditionalGeneration)     deepseek (MultiModalityCausalLM)
    llm.*                           model.language_model.*                 language_model.model.*
    lm_head.weight                  lm_head.weight                         language_model.lm_head.weight
    vision.*                        model.vision_model.*                   vision_model.vision_tower.* (fused qkv)
    und_aligner.layers.j            model.aligner.{fc1,hidden_layers.j-1}  aligner.layers.{2j}
    gen_embed / gen_aligner         model.generation_embeddings / _aligner gen_embed / gen_aligner.layers.{2j}
    gen_head.fc1 / fc2              model.generation_head.proj_out / vision_head  gen_head.output_mlp_projector / vision_head
    vq.*                            model.vqmodel.*                        gen_vision_model.*

transformers' `convert_janus_weights_to_hf.py` documents the same mapping in one direction.
"""

from __future__ import annotations

import torch

from janus_train.models.janus.config import JanusConfig
from janus_train.models.state_dict import (
    KeyTable,
    hf_projector,
    llama_rows,
    rule,
    sequential_projector,
    siglip_rows,
)

FORMATS = ("hf", "deepseek")

_HF_VQ, _DS_VQ = "model.vqmodel", "gen_vision_model"


def _vq_rows() -> list:
    """LlamaGen's VQ: our levels/blocks/attns/resample vs the two external namings (HF: down/up,
    block, block_1/attn_1/block_2; DeepSeek: conv_blocks, res, mid.0/1/2)."""
    rows = [
        rule(r"vq\.(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", hf=_HF_VQ + r".\1.\2.\3", deepseek=_DS_VQ + r".\1.\2.\3"),
        rule(r"vq\.(encoder|decoder)\.mid\.block1\.(.+)", hf=_HF_VQ + r".\1.mid.block_1.\2", deepseek=_DS_VQ + r".\1.mid.0.\2"),
        rule(r"vq\.(encoder|decoder)\.mid\.attn\.(.+)", hf=_HF_VQ + r".\1.mid.attn_1.\2", deepseek=_DS_VQ + r".\1.mid.1.\2"),
        rule(r"vq\.(encoder|decoder)\.mid\.block2\.(.+)", hf=_HF_VQ + r".\1.mid.block_2.\2", deepseek=_DS_VQ + r".\1.mid.2.\2"),
        rule(r"vq\.(quant_conv|post_quant_conv)\.(weight|bias)", hf=_HF_VQ + r".\1.\2", deepseek=_DS_VQ + r".\1.\2"),
        rule(r"vq\.codebook\.weight", hf=f"{_HF_VQ}.quantize.embedding.weight", deepseek=f"{_DS_VQ}.quantize.embedding.weight"),
    ]
    for part, hf_level, resample in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        hf, ds = f"{_HF_VQ}.{part}.{hf_level}", f"{_DS_VQ}.{part}.conv_blocks"
        rows += [
            rule(rf"vq\.{part}\.levels\.(\d+)\.resample\.(.+)", hf=hf + rf".\1.{resample}.\2", deepseek=ds + rf".\1.{resample}.\2"),
            rule(rf"vq\.{part}\.levels\.(\d+)\.blocks\.(\d+)\.shortcut\.(.+)", hf=hf + r".\1.block.\2.nin_shortcut.\3", deepseek=ds + r".\1.res.\2.nin_shortcut.\3"),
            rule(rf"vq\.{part}\.levels\.(\d+)\.blocks\.(\d+)\.(.+)", hf=hf + r".\1.block.\2.\3", deepseek=ds + r".\1.res.\2.\3"),
            rule(rf"vq\.{part}\.levels\.(\d+)\.attns\.(\d+)\.(.+)", hf=hf + r".\1.attn.\2.\3", deepseek=ds + r".\1.attn.\2.\3"),
        ]
    return rows


TABLE = KeyTable(
    formats=FORMATS,
    rules=[
        *llama_rows("llm", hf="model.language_model", deepseek="language_model.model"),
        rule(r"lm_head\.weight", hf="lm_head.weight", deepseek="language_model.lm_head.weight"),
        *siglip_rows("vision", hf="model.vision_model", timm={"deepseek": "vision_model.vision_tower"}),
        rule(r"und_aligner\.layers\.(\d+)\.(weight|bias)", hf=hf_projector("model.aligner"), deepseek=sequential_projector("aligner")),
        rule(r"gen_aligner\.layers\.(\d+)\.(weight|bias)", hf=hf_projector("model.generation_aligner"), deepseek=sequential_projector("gen_aligner")),
        rule(r"gen_embed\.weight", hf="model.generation_embeddings.weight", deepseek="gen_embed.weight"),
        rule(r"gen_head\.fc1\.(weight|bias)", hf=r"model.generation_head.proj_out.\1", deepseek=r"gen_head.output_mlp_projector.\1"),
        rule(r"gen_head\.fc2\.(weight|bias)", hf=r"model.generation_head.vision_head.\1", deepseek=r"gen_head.vision_head.\1"),
        *_vq_rows(),
    ],
    # External tensors that carry nothing we use (training-time statistics, a dropped head).
    ignored={"deepseek": [r"vision_model\.vision_tower\.attn_pool\..*", r"gen_vision_model\.quantize\.codebook_used"]},
)


def native_shapes(cfg: JanusConfig) -> dict[str, tuple[int, ...]]:
    """Every native state-dict key and its shape, from a model built on the meta device (a
    tied lm_head is one tensor with the embedding and is stored once, as the embedding)."""
    from janus_train.models.janus.model import JanusModel

    with torch.device("meta"):
        model = JanusModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.llm.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _untied(sd: dict[str, torch.Tensor], cfg: JanusConfig) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not (cfg.llm.tie_word_embeddings and k == "lm_head.weight")}


def to_native(external: dict[str, torch.Tensor], cfg: JanusConfig, fmt: str) -> dict[str, torch.Tensor]:
    """An external (or native) state dict -> a checked native one."""
    from janus_train.models.state_dict import check_native

    shapes = native_shapes(cfg)
    if fmt == "native":
        return check_native(_untied(external, cfg), shapes)
    # A tied checkpoint may still carry transformers' lm_head copy of the embedding.
    extra = (r"lm_head\.weight",) if fmt == "hf" and cfg.llm.tie_word_embeddings else ()
    return TABLE.to_native(external, shapes, fmt, extra_ignored=extra)


def from_native(native: dict[str, torch.Tensor], cfg: JanusConfig, fmt: str) -> dict[str, torch.Tensor]:
    """A native state dict -> the external (or native) one, checked first."""
    from janus_train.models.state_dict import check_native

    shapes = native_shapes(cfg)
    native = _untied(native, cfg)
    if fmt == "native":
        return dict(check_native(native, shapes))
    return TABLE.from_native(native, shapes, fmt)
