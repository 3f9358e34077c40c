"""Freeze rules: which components train in a stage.

The recipe lists a stage's trainable components explicitly (Janus-Pro Table 2: stage 1 the
adaptors and gen head, stage 2 everything but SigLIP, stage 3 everything; JanusFlow Table 1:
stage 1 the new generation parts and aligners, stage 2 everything but SigLIP, stage 3
everything); this module applies them. The component names and the always-frozen ones are the
model family's (`models/families.py`).
"""

from __future__ import annotations

from torch import nn

from janus_train.models.families import family_of_config


def apply_freeze(model: nn.Module, trainable: list[str]) -> dict[str, bool]:
    """Set requires_grad per component; returns {component: trains?}."""
    family = family_of_config(model.config)
    family.check_trainable(trainable)
    state = {}
    for name in family.components:
        trains = name in trainable
        getattr(model, name).requires_grad_(trains)
        state[name] = trains
    if getattr(model.config.llm, "tie_word_embeddings", False) and state["lm_head"] != state["llm"]:
        # Tied weights are one tensor: it trains if either side does.
        model.lm_head.weight.requires_grad_(True)
    return state
