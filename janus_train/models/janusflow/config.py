"""JanusFlow model configuration: sizes, presets, (de)serialisation.

JanusFlow shares Janus-Pro's LLM (DeepSeek-LLM) and SigLIP understanding encoder; what is its
own is the generation pathway (`FlowConfig`): SDXL-VAE latents -> a ConvNeXt generation
encoder (patchify, blocks) -> LLM tokens; the LLM's outputs at those positions -> a ConvNeXt
generation decoder (with a skip from the encoder) -> the rectified-flow velocity. Plus the
training-only representation-alignment (REPA) projector.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from janus_train.models.attention import ATTENTION_BACKENDS
from janus_train.models.llm import RECOMPUTE_MODES, LLMConfig
from janus_train.models.siglip import VisionConfig

# The model's parts by role, as `JanusFlowModel` names its submodules; stage freeze rules are
# written in these names. `und_begin` is JanusFlow's learned embedding put before every
# understanding image's features.
COMPONENTS: tuple[str, ...] = (
    "llm", "lm_head", "vision", "und_aligner", "und_begin",
    "gen_encoder", "gen_enc_aligner", "gen_dec_norm", "gen_dec_aligner", "gen_decoder", "repa_proj",
)
# Parts that exist only for training (the release has no tensors for them).
TRAINING_ONLY: tuple[str, ...] = ("repa_proj",)
# Parts whose outputs feed the LLM: backward runs through the LLM when one of them trains.
LLM_INPUTS: tuple[str, ...] = ("llm", "vision", "und_aligner", "und_begin", "gen_encoder", "gen_enc_aligner")


@dataclass
class FlowConfig:
    """The rectified-flow generation pathway (DeepSeek's ShallowUViT encoder/decoder)."""

    latent_channels: int = 4  # SDXL-VAE latents
    vae_downsample: int = 8  # pixels per latent cell (384 px -> 48 x 48 latents)
    patch_size: int = 2  # the encoder's patchify stride: 48 x 48 latents -> 24 x 24 = 576 tokens
    kernel_size: int = 2  # the patchify conv's kernel (padding = ceil(kernel - stride))
    width: int = 768  # ConvNeXt channels of encoder and decoder
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    ffn_factor: int = 4  # ConvNeXt block MLP expansion
    norm_eps: float = 1e-6
    # Representation alignment: the LLM layer whose gen-token outputs are aligned (1-based: the
    # output of block k) with SigLIP features of the clean image, through a trainable MLP.
    repa_layer: int = 6
    repa_hidden: int = 2048
    repa_weight: float = 1.0
    # Training times t ~ logit-normal(mean, std) (sigmoid of a normal draw). The paper follows
    # SD3 without giving the parameters; SD3's default is (0, 1). The prompt dropout for
    # classifier-free guidance is the data's `cfg_dropout` (one setting for both families).
    t_logit_mean: float = 0.0
    t_logit_std: float = 1.0


@dataclass
class JanusFlowConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(aligner_depth=1))
    flow: FlowConfig = field(default_factory=FlowConfig)
    attention: str = "sdpa"
    recompute: str = "none"
    recompute_every: int = 2
    name: str = "custom"

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Both pathways see the same image size (384 px in the release)."""
        return self.vision.image_size

    @property
    def latent_size(self) -> int:
        return self.image_size // self.flow.vae_downsample

    @property
    def gen_grid(self) -> int:
        return self.latent_size // self.flow.patch_size

    @property
    def num_gen_tokens(self) -> int:
        return self.gen_grid * self.gen_grid

    @property
    def num_image_tokens(self) -> int:
        """Image placeholder tokens per understanding image (SigLIP patches), as Janus-Pro counts them."""
        side = self.vision.image_size // self.vision.patch_size
        return side * side

    @property
    def num_und_tokens(self) -> int:
        """Positions an understanding image fills: the begin-of-understanding embedding + patches."""
        side = self.vision.image_size // self.vision.patch_size
        return 1 + side * side

    def validate(self) -> "JanusFlowConfig":
        """Raise ValueError naming the bad field; returns self for chaining."""
        llm, vis, fl = self.llm, self.vision, self.flow
        if llm.hidden_size % llm.num_heads:
            raise ValueError(f"llm.hidden_size={llm.hidden_size} is not divisible by llm.num_heads={llm.num_heads}")
        if llm.num_heads % llm.num_kv_heads:
            raise ValueError(f"llm.num_heads={llm.num_heads} is not divisible by llm.num_kv_heads={llm.num_kv_heads}")
        if vis.image_size % vis.patch_size:
            raise ValueError(f"vision.image_size={vis.image_size} is not divisible by vision.patch_size={vis.patch_size}")
        if vis.aligner_depth != 1:
            raise ValueError(f"vision.aligner_depth={vis.aligner_depth}: JanusFlow's und aligner is one linear layer (1)")
        if self.image_size % fl.vae_downsample:
            raise ValueError(f"vision.image_size={self.image_size} is not divisible by flow.vae_downsample={fl.vae_downsample}")
        if self.latent_size % fl.patch_size:
            raise ValueError(f"latent side {self.latent_size} is not divisible by flow.patch_size={fl.patch_size}")
        if fl.kernel_size < fl.patch_size:
            raise ValueError(f"flow.kernel_size={fl.kernel_size} must be >= flow.patch_size={fl.patch_size}")
        if not 1 <= fl.repa_layer <= llm.num_layers:
            raise ValueError(f"flow.repa_layer={fl.repa_layer} must be within 1..llm.num_layers={llm.num_layers}")
        if not fl.t_logit_std > 0:
            raise ValueError(f"flow.t_logit_std={fl.t_logit_std} must be > 0")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_BACKENDS}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={self.recompute!r} is not one of {RECOMPUTE_MODES}")
        return self

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JanusFlowConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown JanusFlowConfig keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for sub_name, sub_cls in (("llm", LLMConfig), ("vision", VisionConfig), ("flow", FlowConfig)):
            sub = dict(d.pop(sub_name, {}) or {})
            bad = set(sub) - {f.name for f in dataclasses.fields(sub_cls)}
            if bad:
                raise ValueError(f"unknown {sub_name} config keys: {sorted(bad)}")
            if sub_name == "vision":
                sub.setdefault("aligner_depth", 1)  # JanusFlow's und aligner is one linear layer
            kwargs[sub_name] = sub_cls(**sub)
        kwargs.update(d)
        return cls(**kwargs).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | None = None) -> "JanusFlowConfig":
        """A named preset with dotted-key overrides, e.g. {"flow.width": 64}."""
        if name not in PRESETS:
            raise ValueError(f"unknown JanusFlow preset {name!r}; choose one of {sorted(PRESETS)}")
        d = PRESETS[name]().to_dict()
        for key, value in (overrides or {}).items():
            node = d
            *parents, leaf = key.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ValueError(f"unknown model config key {key!r}")
                node = node[p]
            if leaf not in node:
                raise ValueError(f"unknown model config key {key!r}")
            node[leaf] = value
        return cls.from_dict(d)


def janusflow_1_3b() -> JanusFlowConfig:
    """The release's sizes (deepseek-ai/JanusFlow-1.3B): DeepSeek-LLM 1.3B (24 x 2048), SigLIP-L/16
    at 384 px (577 und positions with the begin embedding), SDXL-VAE latents 4 x 48 x 48 patchified
    2 x 2 into 576 tokens, ConvNeXt width 768 with two blocks on each side."""
    return JanusFlowConfig(
        name="janusflow_1_3b",
        llm=LLMConfig(hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16, num_kv_heads=16,
                      max_position_embeddings=4096),
        vision=VisionConfig(aligner_depth=1),
        flow=FlowConfig(),
    )


def janusflow_tiny() -> JanusFlowConfig:
    """For tests: every part present at toy width; a forward pass in milliseconds on CPU. 64 px
    images: 16 und patches, latents 4 x 8 x 8 patchified into 16 gen tokens."""
    return JanusFlowConfig(
        name="janusflow_tiny",
        llm=LLMConfig(vocab_size=1024, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=4,
                      max_position_embeddings=4096),
        vision=VisionConfig(image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, aligner_depth=1),
        flow=FlowConfig(width=32, repa_layer=1, repa_hidden=64),
    )


def janusflow_mini32() -> JanusFlowConfig:
    """The JanusFlow demo's model: Janus-Pro's `mini32` LLM (4 x 128) and SigLIP (32 px, patch 8:
    16 und patches), and a generation path at the same grid: a VAE with 4x downsampling (32 px ->
    4 x 8 x 8 latents, `train_tokenizer --kind vae`), patchified 2 x 2 into 16 latent tokens, so
    REPA compares 4 x 4 grids as the release compares 24 x 24 ones. REPA at block 2 of 4."""
    return JanusFlowConfig(
        name="janusflow_mini32",
        llm=LLMConfig(vocab_size=1024, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=4,
                      max_position_embeddings=4096),
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=2, aligner_depth=1),
        flow=FlowConfig(vae_downsample=4, width=64, repa_layer=2, repa_hidden=128),
    )


PRESETS = {"janusflow_tiny": janusflow_tiny, "janusflow_mini32": janusflow_mini32, "janusflow_1_3b": janusflow_1_3b}
