"""Model FLOPs of a Janus train step, and MFU.

Per token, a weight matrix with N parameters costs 2N FLOPs forward; backward costs 2N more
for the input gradient and 2N for the weight gradient. So a component costs, per token:

    6N  trainable                       (forward + input grad + weight grad)
    4N  frozen, but gradients pass back through it to something trainable (e.g. the frozen
        LLM in stage 1, which the adaptors train through)
    2N  frozen with nothing trainable before it (forward only: SigLIP in stages 1-2)

Attention scores/values add, per layer and document of length s: 4·s²·d forward (QK^T and
AV), counting only the causal half for the LLM (2·s²·d) because that is what flash-attn varlen
computes; x3 with backward, x1 forward-only. Tokens are counted where they run: LLM costs are
over non-pad tokens, lm_head over text-supervised positions only (the model skips the rest),
gen_head over gen-supervised positions, SigLIP over 576 (tiny: 16) patches per und image,
the gen adaptor over gen input positions. Embedding lookups are free. JanusFlow: the
generation encoder, decoder and their aligners count as one gen adaptor at 2N per latent
position (their convolutions are per-position linear maps, ConvNeXt's depthwise ones included;
the REPA projector and SigLIP's no-grad view of the gen images are left out, a few per cent).

MFU = model FLOPs per second / (devices x peak FLOP/s per device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from janus_train.models.janus.config import JanusConfig
from janus_train.models.janus.config import grads_flow_into_llm
from janus_train.models.janusflow.config import LLM_INPUTS as _FLOW_LLM_INPUTS
from janus_train.models.janusflow.config import JanusFlowConfig

# JanusFlow's generation path (one adaptor in the FLOP model); its parts that feed the LLM are
# the config's LLM_INPUTS.
_FLOW_GEN_PATH = ("gen_encoder", "gen_enc_aligner", "gen_dec_norm", "gen_dec_aligner", "gen_decoder")

# Dense bf16 peaks (FLOP/s) by device-name fragment.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "H800": 989e12, "L40S": 362e12}

FORMULA = (
    "flops = sum_components mult*2*N*tokens + attention; mult 3 trainable / 2 frozen with grads "
    "passing / 1 forward-only; LLM attention 2*s^2*d per layer per doc (causal half) x mult"
)


@dataclass(frozen=True)
class ComponentSizes:
    llm_layers: int  # non-embedding LLM parameters
    lm_head: int
    gen_head: int
    vision: int
    und_aligner: int
    gen_aligner: int


def component_sizes(cfg: JanusConfig | JanusFlowConfig) -> ComponentSizes:
    from janus_train.models.families import family_of_config

    with torch.device("meta"):
        m = family_of_config(cfg).build(cfg)

    def n(mod) -> int:
        return sum(p.numel() for p in mod.parameters())

    if isinstance(cfg, JanusFlowConfig):
        return ComponentSizes(
            llm_layers=n(m.llm) - m.llm.embed_tokens.weight.numel(),
            lm_head=m.lm_head.weight.numel(),
            gen_head=0,
            vision=n(m.vision) - m.vision.pos_embed.numel(),
            und_aligner=n(m.und_aligner),
            gen_aligner=sum(n(getattr(m, part)) for part in _FLOW_GEN_PATH),
        )

    return ComponentSizes(
        llm_layers=n(m.llm) - m.llm.embed_tokens.weight.numel(),
        lm_head=m.lm_head.weight.numel(),
        gen_head=n(m.gen_head),
        vision=n(m.vision) - m.vision.pos_embed.numel(),
        und_aligner=n(m.und_aligner),
        gen_aligner=n(m.gen_aligner),
    )


def step_flops(cfg: JanusConfig | JanusFlowConfig, sizes: ComponentSizes, trainable: list[str], counts: dict[str, float]) -> float:
    """Model FLOPs of one optimizer step from the global batch counts (see train_step)."""
    t = set(trainable)
    flow = isinstance(cfg, JanusFlowConfig)
    through_llm = bool(set(_FLOW_LLM_INPUTS) & t) if flow else grads_flow_into_llm(trainable)

    def mult(name: str, grads_pass: bool) -> int:
        return 3 if name in t else (2 if grads_pass else 1)

    llm_m = mult("llm", through_llm and ("llm" not in t))
    # The heads: input grads are needed iff anything at or before the LLM trains.
    head_pass = through_llm or "llm" in t
    vision_m = mult("vision", False)
    und_al_m = mult("und_aligner", "vision" in t)
    d, layers = cfg.llm.hidden_size, cfg.llm.num_layers
    v = cfg.vision
    vis_tokens = counts["images"] * cfg.num_image_tokens
    flops = 0.0
    flops += llm_m * 2 * sizes.llm_layers * counts["tokens"]
    flops += llm_m * layers * 2 * d * counts["doc_len_sq"]  # causal half of 4·s²·d
    flops += mult("lm_head", head_pass) * 2 * sizes.lm_head * counts["text_sup"]
    flops += mult("gen_head", head_pass) * 2 * sizes.gen_head * counts["gen_sup"]
    flops += vision_m * (2 * sizes.vision * vis_tokens + v.num_layers * 4 * v.hidden_size * cfg.num_image_tokens**2 * counts["images"])
    flops += und_al_m * 2 * sizes.und_aligner * vis_tokens
    flops += mult("gen_encoder" if flow else "gen_aligner", False) * 2 * sizes.gen_aligner * counts["gen_inputs"]
    return flops


def device_peak_flops(device: torch.device, override: float | None) -> float | None:
    """Peak FLOP/s of one device: the override, a known GPU's bf16 peak, or None (CPU)."""
    if override:
        return float(override)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_FLOPS.items():
            if key in name:
                return peak
    return None
