"""Janus-Pro model configuration: sizes, presets, overrides, (de)serialisation.

One dataclass per part (LLM, SigLIP vision tower, VQ tokenizer + generation pathway) nested
in `JanusConfig`. Presets are plain functions of no arguments; any field can be overridden
with a dotted key (`llm.num_layers=4`).
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



# The model's parts by role, as `JanusModel` names its submodules; stage freeze rules and the
# FLOP/memory models are written in these names.
COMPONENTS: tuple[str, ...] = ("llm", "lm_head", "vision", "und_aligner", "vq", "gen_embed", "gen_aligner", "gen_head")
# Frozen in every stage: Janus-Pro trains on codes pre-extracted by the VQ tokenizer.
ALWAYS_FROZEN: tuple[str, ...] = ("vq",)
TRAINABLE: tuple[str, ...] = tuple(c for c in COMPONENTS if c not in ALWAYS_FROZEN)
# Components whose training makes gradients flow back through the LLM (it trains, or something
# at its input does).
LLM_INPUTS = ("llm", "vision", "und_aligner", "gen_embed", "gen_aligner")


def check_trainable(trainable: list[str]) -> None:
    """ValueError naming the first component that cannot train."""
    for comp in trainable:
        if comp in ALWAYS_FROZEN:
            raise ValueError(f"{comp} is frozen in every stage (Janus-Pro trains on pre-extracted codes)")
        if comp not in COMPONENTS:
            raise ValueError(f"unknown component {comp!r}; choose from {list(TRAINABLE)}")
    if not trainable:
        raise ValueError("no trainable component")


def grads_flow_into_llm(trainable: list[str]) -> bool:
    """Whether backward passes through the LLM (it trains, or something before it does)."""
    return bool(set(LLM_INPUTS) & set(trainable))


@dataclass
class VQConfig:
    """LlamaGen VQ-16 tokenizer plus the generation embedding, aligner and head."""

    codebook_size: int = 16384
    code_dim: int = 8
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    latent_channels: int = 256
    in_channels: int = 3
    out_channels: int = 3
    # LlamaGen looks codes up by cosine similarity (both sides l2-normalised).
    codebook_l2_norm: bool = True
    # GroupNorm groups of the VQ's conv blocks. LlamaGen (and transformers' Janus, which cannot
    # change it) use 32; at 32 channels that is one channel per group, which a tiny tokenizer
    # learns far more slowly with, so tiny presets may use fewer (see docs/evaluation.md).
    norm_groups: int = 32
    gen_aligner_depth: int = 2
    # Width of the gen head's hidden layer; None means the LLM hidden size.
    gen_head_hidden: int | None = None

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)


@dataclass
class JanusConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    # How packed rows are attended; see janus_train/models/attention.py.
    attention: str = "sdpa"
    # Activation checkpointing of LLM blocks: none | full | selective.
    recompute: str = "none"
    # With "selective": checkpoint every Nth layer (1 = every layer's attention only).
    recompute_every: int = 2
    # The tokenizer's <image_placeholder> id; only needed to write HF configs.
    image_token_id: int | None = None
    name: str = "custom"

    @property
    def num_image_tokens(self) -> int:
        side = self.vision.image_size // self.vision.patch_size
        return side * side

    @property
    def gen_image_size(self) -> int:
        # Janus uses one image size for both pathways (384 px -> 24x24 patches and codes).
        return self.vision.image_size

    @property
    def gen_grid(self) -> int:
        return self.gen_image_size // self.vq.downsample

    @property
    def gen_head_hidden(self) -> int:
        return self.vq.gen_head_hidden or self.llm.hidden_size

    def validate(self) -> "JanusConfig":
        """Raise ValueError naming the bad field; returns self for chaining."""
        llm, vis, vq = self.llm, self.vision, self.vq
        if llm.hidden_size % llm.num_heads:
            raise ValueError(f"llm.hidden_size={llm.hidden_size} is not divisible by llm.num_heads={llm.num_heads}")
        if llm.head_dim % 2:
            raise ValueError(f"llm head_dim={llm.head_dim} must be even for RoPE")
        if llm.num_heads % llm.num_kv_heads:
            raise ValueError(f"llm.num_heads={llm.num_heads} is not divisible by llm.num_kv_heads={llm.num_kv_heads}")
        if vis.hidden_size % vis.num_heads:
            raise ValueError(f"vision.hidden_size={vis.hidden_size} is not divisible by vision.num_heads={vis.num_heads}")
        if vis.image_size % vis.patch_size:
            raise ValueError(f"vision.image_size={vis.image_size} is not divisible by vision.patch_size={vis.patch_size}")
        if vq.downsample != vis.patch_size:
            raise ValueError(
                f"vq downsample factor 2**(len(vq.channel_multipliers)-1)={vq.downsample} must equal "
                f"vision.patch_size={vis.patch_size} so both pathways see the same token grid"
            )
        for mult in vq.channel_multipliers:
            if (vq.base_channels * mult) % vq.norm_groups:
                raise ValueError(
                    f"vq.base_channels*multiplier={vq.base_channels * mult} must be divisible by vq.norm_groups={vq.norm_groups}"
                )
        if vq.latent_channels % vq.norm_groups:
            raise ValueError(f"vq.latent_channels={vq.latent_channels} must be divisible by vq.norm_groups={vq.norm_groups}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_BACKENDS}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(
                f"recompute={self.recompute!r} is not one of {RECOMPUTE_MODES}"
            )
        if self.recompute_every < 1:
            raise ValueError(f"recompute_every={self.recompute_every} must be >= 1")
        return self

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vq"]["channel_multipliers"] = list(self.vq.channel_multipliers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JanusConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown JanusConfig keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for sub_name, sub_cls in (("llm", LLMConfig), ("vision", VisionConfig), ("vq", VQConfig)):
            sub = dict(d.pop(sub_name, {}) or {})
            bad = set(sub) - {f.name for f in dataclasses.fields(sub_cls)}
            if bad:
                raise ValueError(f"unknown {sub_name} config keys: {sorted(bad)}")
            if "channel_multipliers" in sub:
                sub["channel_multipliers"] = tuple(sub["channel_multipliers"])
            kwargs[sub_name] = sub_cls(**sub)
        kwargs.update(d)
        return cls(**kwargs).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "JanusConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | None = None) -> "JanusConfig":
        """A named preset with dotted-key overrides, e.g. {"llm.num_layers": 4}."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[name]()
        return apply_overrides(cfg, overrides or {}).validate()


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["llm.num_layers=4", "vq.channel_multipliers=[1,2,2]"] -> {key: value}, values read as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def apply_overrides(cfg: JanusConfig, overrides: dict[str, Any]) -> JanusConfig:
    """Return a copy of cfg with dotted keys replaced; unknown keys raise naming the key."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"unknown model config key {key!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"unknown model config key {key!r}")
        node[parts[-1]] = value
    return JanusConfig.from_dict(d)


def tiny() -> JanusConfig:
    """For tests and the demo: a forward pass in milliseconds on CPU, 64 px images, 16 tokens."""
    return JanusConfig(
        name="tiny",
        llm=LLMConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=172,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            max_position_embeddings=4096,
        ),
        vision=VisionConfig(image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2),
        vq=VQConfig(
            codebook_size=256,
            code_dim=8,
            base_channels=32,
            channel_multipliers=(1, 1, 1, 1, 2),
            num_res_blocks=1,
            latent_channels=32,
        ),
    )


def mini() -> JanusConfig:
    """The learnability model of the demo and `tiny_learn`: 64 px images as 64 tokens in both
    pathways (SigLIP patch 8, a VQ-8 tokenizer with 256 codes), a 4-layer 128-wide LLM. Small
    enough to learn the shapes world on two CPU cores in minutes; its VQ is meant to be trained
    (python -m janus_train.tools.train_tokenizer --preset mini), with 8 norm groups: at 32
    channels transformers' 32 groups (one channel each) make a tiny tokenizer learn several
    times slower."""
    return JanusConfig(
        name="mini",
        llm=LLMConfig(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=344,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            max_position_embeddings=4096,
        ),
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=2),
        vq=VQConfig(
            # 256, not 1024: on the flat-coloured demo world a 1024-code book spreads one colour
            # over many near-duplicate codes (held-out perplexity ~520), which reconstructs no
            # better (measured: 23.7 dB vs 24.9 dB at 256) and gives generation a noisier target.
            codebook_size=256,
            code_dim=8,
            base_channels=32,
            channel_multipliers=(1, 1, 1, 1),
            num_res_blocks=0,
            latent_channels=32,
            norm_groups=8,
        ),
    )


def mini32() -> JanusConfig:
    """The demo's model: `mini` at 32 px, i.e. 16 image tokens per pathway instead of 64. A
    packed row then holds about twice the documents, so in the demo's ten minutes the model
    sees enough drawings to learn the shapes (at 64 px it learned colours and blobs); the shapes
    stay readable at 32 px (the `shapes` scorer reads 99.7% of real ones). `tiny_learn` keeps
    64 px: its figures and the tokenizer's reconstruction goal are measured there."""
    cfg = mini()
    return dataclasses.replace(cfg, name="mini32", vision=dataclasses.replace(cfg.vision, image_size=32))


def small() -> JanusConfig:
    """A few-hundred-million-parameter model for benchmarks and memory-plan cross-checks."""
    return JanusConfig(
        name="small",
        llm=LLMConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=8),
        vision=VisionConfig(image_size=128, patch_size=16, hidden_size=256, num_layers=4, num_heads=4),
        vq=VQConfig(
            codebook_size=4096,
            base_channels=32,
            channel_multipliers=(1, 1, 2, 2, 4),
            num_res_blocks=1,
            latent_channels=64,
        ),
    )


def janus_pro_1b() -> JanusConfig:
    return JanusConfig(name="janus_pro_1b", llm=LLMConfig(hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16, num_kv_heads=16))


def janus_pro_7b() -> JanusConfig:
    return JanusConfig(name="janus_pro_7b", llm=LLMConfig(hidden_size=4096, intermediate_size=11008, num_layers=30, num_heads=32, num_kv_heads=32))


PRESETS = {"tiny": tiny, "mini": mini, "mini32": mini32, "small": small, "janus_pro_1b": janus_pro_1b, "janus_pro_7b": janus_pro_7b}
