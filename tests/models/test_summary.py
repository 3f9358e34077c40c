"""Acceptance 4: parameter counts equal transformers' for the same configs (meta device)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from janus_train.models.janus import state_dict_adapter as adapter
from janus_train.models.janus.config import JanusConfig
from janus_train.models.summary import component_counts


def hf_count(cfg: JanusConfig) -> int:
    from transformers import JanusConfig as HFConfig
    from transformers import JanusForConditionalGeneration

    with torch.device("meta"):
        model = JanusForConditionalGeneration(HFConfig(**adapter.config_to_hf(cfg)))
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


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
    assert d["total"] == sum(v for k, v in d.items() if k not in ("model", "total"))
    assert 7.3e9 < d["total"] < 7.5e9
    assert d["vision"] == 303_688_704
