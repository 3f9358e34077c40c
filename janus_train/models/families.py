"""The model families janus-train trains, and what the engine needs to know about each.

    family = family_of_preset("janusflow_tiny")      # or family_of_config(cfg)
    cfg = family.config(preset, overrides)           # JanusConfig | JanusFlowConfig
    model = family.build(cfg)                        # JanusModel | JanusFlowModel
    family.check_trainable(["gen_encoder", ...])     # ValueError naming a bad component
    family.grads_flow_into_llm(["und_aligner"])     # True: backward runs through the LLM

Janus-Pro generates VQ codes (one cross-entropy over every supervised token); JanusFlow
generates by rectified flow (CE for und/text, a velocity loss per latent element, and REPA per
latent token). `loss_groups` says how the training step normalises them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from janus_train.models.janus import config as janus_config
from janus_train.models.janusflow import config as flow_config


@dataclass(frozen=True)
class LossGroup:
    """Losses normalised together: their summed values over the step's global count of them."""

    names: tuple[str, ...]
    weights: dict[str, float] | None = None  # None: every weight 1 (a plain sum)


@dataclass(frozen=True)
class Family:
    name: str  # "janus" | "janusflow"
    gen_kind: str  # "vq" | "flow"
    presets: dict[str, Callable[[], Any]]
    components: tuple[str, ...]  # submodule names the freeze rules use
    always_frozen: tuple[str, ...]
    losses: tuple[str, ...]  # the names of the model's loss_sum entries, in order
    llm_inputs: tuple[str, ...]  # components whose outputs feed the LLM (and the LLM itself)

    def config(self, preset: str, overrides: dict[str, Any] | None = None):
        cls = flow_config.JanusFlowConfig if self.gen_kind == "flow" else janus_config.JanusConfig
        return cls.from_preset(preset, overrides)

    def build(self, cfg: Any) -> nn.Module:
        if self.gen_kind == "flow":
            from janus_train.models.janusflow.model import JanusFlowModel

            return JanusFlowModel(cfg)
        from janus_train.models.janus.model import JanusModel

        return JanusModel(cfg)

    def grads_flow_into_llm(self, trainable: list[str]) -> bool:
        """Whether backward passes through the LLM (it trains, or something before it does)."""
        return bool(set(self.llm_inputs) & set(trainable))

    def check_trainable(self, trainable: list[str]) -> None:
        """ValueError naming the first component that cannot train."""
        if self.gen_kind == "vq":
            janus_config.check_trainable(trainable)
            return
        for comp in trainable:
            if comp not in self.components:
                raise ValueError(f"unknown JanusFlow component {comp!r}; choose from {list(self.components)}")
        if not trainable:
            raise ValueError("no trainable component")

    def loss_groups(self, loss_weights: dict[str, float], model_cfg: Any) -> list[LossGroup]:
        """Janus-Pro: one CE over all supervised tokens (task weights optional). JanusFlow: CE
        over und+text tokens, the flow loss over latent elements (weighted like gen), REPA over
        latent tokens (times flow.repa_weight)."""
        w = {t: float(loss_weights.get(t, 1.0)) for t in ("und", "text", "gen")}
        if self.gen_kind == "vq":
            return [LossGroup(("und", "text", "gen"), None if all(v == 1.0 for v in w.values()) else w)]
        ce = None if w["und"] == w["text"] == 1.0 else {"und": w["und"], "text": w["text"]}
        flow_w = None if w["gen"] == 1.0 else {"flow": w["gen"]}
        repa_w = float(model_cfg.flow.repa_weight)
        return [LossGroup(("und", "text"), ce), LossGroup(("flow",), flow_w),
                LossGroup(("repa",), None if repa_w == 1.0 else {"repa": repa_w})]


JANUS = Family("janus", "vq", janus_config.PRESETS, janus_config.COMPONENTS, janus_config.ALWAYS_FROZEN, ("und", "text", "gen"),
               janus_config.LLM_INPUTS)
JANUSFLOW = Family("janusflow", "flow", flow_config.PRESETS, flow_config.COMPONENTS, (), ("und", "text", "flow", "repa"),
                   flow_config.LLM_INPUTS)
FAMILIES: tuple[Family, ...] = (JANUS, JANUSFLOW)
ALL_PRESETS: tuple[str, ...] = tuple(p for f in FAMILIES for p in f.presets)


def family_of_preset(preset: str) -> Family:
    for f in FAMILIES:
        if preset in f.presets:
            return f
    raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(ALL_PRESETS)}")


def family_of_config(cfg: Any) -> Family:
    return JANUSFLOW if isinstance(cfg, flow_config.JanusFlowConfig) else JANUS
