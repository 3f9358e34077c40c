"""Acceptance 4: parameter counts equal transformers' for the same configs (meta device)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from janus_train.models.janus import config_formats
from janus_train.models.janus.config import JanusConfig
from janus_train.models.summary import component_counts


# Our component -> the transformers submodule holding the same parameters.
HF_PARTS = {
    "llm": "model.language_model",
    "lm_head": "lm_head",
    "vision": "model.vision_model",
    "und_aligner": "model.aligner",
    "vq": "model.vqmodel",
    "gen_embed": "model.generation_embeddings",
    "gen_aligner": "model.generation_aligner",
    "gen_head": "model.generation_head",
}


def _unique(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def hf_counts(cfg: JanusConfig) -> dict[str, int]:
    """Parameter counts of transformers' own Janus classes for the same config (meta device)."""
    from transformers import JanusConfig as HFConfig
    from transformers import JanusForConditionalGeneration

    with torch.device("meta"):
        model = JanusForConditionalGeneration(HFConfig(**config_formats.config_to_hf(cfg)))
    counts = {name: _unique(model.get_submodule(path).parameters()) for name, path in HF_PARTS.items()}
    if cfg.llm.tie_word_embeddings:
        counts["lm_head"] = 0  # the embedding's tensor, counted under llm
    counts["total"] = _unique(model.parameters())
    return counts


def hf_count(cfg: JanusConfig) -> int:
    return hf_counts(cfg)["total"]


@pytest.mark.parametrize("name", ["janus_pro_1b", "janus_pro_7b", "tiny"])
def test_totals_match_transformers(name):
    cfg = JanusConfig.from_preset(name)
    assert component_counts(cfg)["total"] == hf_count(cfg)


def test_tied_embeddings_counted_once():
    cfg = JanusConfig.from_preset("tiny", {"llm.tie_word_embeddings": True})
    counts = component_counts(cfg)
    assert counts["lm_head"] == 0
    assert counts["total"] == hf_count(cfg)


def test_cli_prints_components():
    out = subprocess.run(
        [sys.executable, "-m", "janus_train.models.summary", "janus_pro_7b", "--json"], capture_output=True, text=True, check=True
    )
    d = json.loads(out.stdout)
    # Every part and the total as transformers counts them with its own classes.
    assert {k: v for k, v in d.items() if k != "model"} == hf_counts(JanusConfig.from_preset("janus_pro_7b"))
    assert d["vision"] == 303_688_704
