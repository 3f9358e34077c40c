"""Freeze rules: which components train in a stage (Janus-Pro Table 2).

  stage 1: und_aligner, gen_embed, gen_aligner, gen_head   (LLM and encoders frozen)
  stage 2: everything but SigLIP (vision) and the VQ tokenizer
  stage 3: everything but the VQ tokenizer (SigLIP unfrozen)

The recipe lists the components explicitly; this module applies them.
"""

from __future__ import annotations

from torch import nn

COMPONENTS = ("llm", "lm_head", "vision", "und_aligner", "vq", "gen_embed", "gen_aligner", "gen_head")


def apply_freeze(model: nn.Module, trainable: list[str]) -> dict[str, bool]:
    """Set requires_grad per component; returns {component: trains?}."""
    unknown = set(trainable) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown trainable component(s) {sorted(unknown)}; choose from {COMPONENTS}")
    if "vq" in trainable:
        raise ValueError("the VQ tokenizer is frozen in every stage")
    state = {}
    for name in COMPONENTS:
        trains = name in trainable
        getattr(model, name).requires_grad_(trains)
        state[name] = trains
    if getattr(model.config.llm, "tie_word_embeddings", False) and state["lm_head"] != state["llm"]:
        # Tied weights are one tensor: it trains if either side does.
        model.lm_head.weight.requires_grad_(True)
    return state


def grads_flow_into_llm(trainable: list[str]) -> bool:
    """Whether backward passes through the LLM (it trains, or something before it does)."""
    return bool({"llm", "vision", "und_aligner", "gen_embed", "gen_aligner"} & set(trainable))
