"""JanusFlow's release config.json (DeepSeek's `MultiModalityConfig` of janus/janusflow) <-> our
`JanusFlowConfig`. The weights' key table is in `keys.py`.

The release describes each part as `{"cls": ..., "params": {...}}`: `vision_und_enc_config`
(CLIPVisionTower: SigLIP by model_name), `vision_gen_enc_config` (ShallowUViTEncoder),
`vision_gen_dec_config` (ShallowUViTDecoder), and `language_config` (a LlamaConfig). DeepSeek's
modeling code writes the aligner widths (1024 -> 2048, 768 -> 2048) into the code; we derive them
from the parts instead, so checkpoints at other sizes (our tiny ones) use the same layout.
"""

from __future__ import annotations

import dataclasses

from typing import Any

from janus_train.models.janusflow.config import FlowConfig, JanusFlowConfig
from janus_train.models.llm import llama_config_from_llm, llm_config_from_llama
from janus_train.models.siglip import deepseek_vision_params, vision_from_deepseek

# The encoder/decoder options we implement, with the only value we support where the release
# code has a switch (a file asking for another one is refused, naming the option).
_FIXED = {
    "vision_gen_enc_config": {"use_mid_block": True, "dropout": 0.0, "use_bias": True},
    "vision_gen_dec_config": {"use_mid_block": True, "dropout": 0.0, "use_bias": True, "upsamples": 1},
}


def is_janusflow_release(d: dict[str, Any]) -> bool:
    return "vision_gen_enc_config" in d and "language_config" in d


def _part(d: dict[str, Any], key: str, cls: str) -> dict[str, Any]:
    try:
        part = d[key]
    except KeyError:
        raise ValueError(f"JanusFlow config.json lacks {key!r}") from None
    if part.get("cls", cls) != cls:
        raise ValueError(f"{key}.cls={part.get('cls')!r}; only {cls} is supported")
    params = dict(part.get("params") or {})
    for opt, value in _FIXED.get(key, {}).items():
        if params.get(opt, value) != value:
            raise ValueError(f"{key}.params.{opt}={params[opt]!r} is not supported (only {value!r})")
    return params


def _single(params: dict[str, Any], key: str) -> int:
    channels = list(params.get("block_out_channels", [768]))
    if len(channels) != 1:
        raise ValueError(f"{key}.params.block_out_channels={channels}: only one level is supported")
    return int(channels[0])


def config_from_release(d: dict[str, Any], name: str = "from_release") -> JanusFlowConfig:
    """Our config from the release's config.json; a ValueError names the first unsupported field."""
    if "language_config" not in d:
        raise ValueError("JanusFlow config.json lacks 'language_config'")
    llm = llm_config_from_llama(d["language_config"])
    und = _part(d, "vision_und_enc_config", "CLIPVisionTower")
    enc = _part(d, "vision_gen_enc_config", "ShallowUViTEncoder")
    dec = _part(d, "vision_gen_dec_config", "ShallowUViTDecoder")
    width = _single(enc, "vision_gen_enc_config")
    if _single(dec, "vision_gen_dec_config") != width or int(dec.get("in_channels", 768)) != width:
        raise ValueError(f"vision_gen_dec_config widths {dec.get('block_out_channels')}/{dec.get('in_channels')} != encoder width {width}")
    for key, params in (("vision_gen_enc_config", enc), ("vision_gen_dec_config", dec)):
        if int(params.get("hidden_size", 2048)) != llm.hidden_size:
            raise ValueError(f"{key}.params.hidden_size={params.get('hidden_size')} != language hidden_size={llm.hidden_size}")
    latent = int(enc.get("input_channels", 3))
    if int(dec.get("out_channels", 3)) != latent:
        raise ValueError(f"vision_gen_dec_config out_channels={dec.get('out_channels')} != encoder input_channels={latent}")
    stride = int(enc.get("stride", 4))
    # Training-only settings kept by our exports; keys of other versions are ignored.
    known = {f.name for f in dataclasses.fields(FlowConfig)}
    extra = {k: v for k, v in dict(enc.get("janus_train", {})).items() if k in known}
    flow = FlowConfig(
        latent_channels=latent,
        patch_size=stride,
        kernel_size=int(enc.get("kernel_size", 7)),
        width=width,
        encoder_blocks=int(enc.get("layers_in_middle", 2)),
        decoder_blocks=int(dec.get("layers_in_middle", 2)),
        norm_eps=float(enc.get("norm_eps", 1e-6)),
        **extra,
    )
    if enc.get("padding") is not None and int(enc["padding"]) != max(0, flow.kernel_size - flow.patch_size):
        raise ValueError(f"vision_gen_enc_config.params.padding={enc['padding']} is not ceil(kernel_size - stride)")
    return JanusFlowConfig(name=name, llm=llm, vision=vision_from_deepseek(und, aligner_depth=1), flow=flow).validate()


def config_to_release(cfg: JanusFlowConfig) -> dict[str, Any]:
    """The release-layout config.json of `cfg` (what `convert --dst-format deepseek` writes)."""
    llm, fl = cfg.llm, cfg.flow
    common = {"block_out_channels": [fl.width], "layers_in_middle": None, "hidden_size": llm.hidden_size, "norm_eps": fl.norm_eps,
              "elementwise_affine": True, "use_bias": True, "dropout": 0.0, "use_mid_block": True}
    enc = dict(common, input_channels=fl.latent_channels, stride=fl.patch_size, kernel_size=fl.kernel_size, layers_in_middle=fl.encoder_blocks,
               janus_train={k: getattr(fl, k) for k in ("vae_downsample", "ffn_factor", "repa_layer", "repa_hidden", "repa_weight", "t_logit_mean", "t_logit_std")})
    dec = dict(common, in_channels=fl.width, out_channels=fl.latent_channels, upsamples=1, layers_in_middle=fl.decoder_blocks)
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "language_config": llama_config_from_llm(llm),
        "vision_und_enc_config": {"cls": "CLIPVisionTower", "model_type": "vision_und_enc", "params": deepseek_vision_params(cfg.vision)},
        "vision_gen_enc_config": {"cls": "ShallowUViTEncoder", "model_type": "vision_gen_enc", "params": enc},
        "vision_gen_dec_config": {"cls": "ShallowUViTDecoder", "model_type": "vision_gen_dec", "params": dec},
    }
