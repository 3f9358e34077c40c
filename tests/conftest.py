"""Shared fixtures: tiny random checkpoints written to disk once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep intra-op threads from oversubscribing when tests spawn processes.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_ckpt_root(tmp_path_factory):
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_ckpts")
    for fmt in ("hf", "deepseek", "native"):
        make_tiny_checkpoint(root / fmt, fmt=fmt, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_hf_ckpt(tiny_ckpt_root):
    return tiny_ckpt_root / "hf"


@pytest.fixture(scope="session")
def tiny_deepseek_ckpt(tiny_ckpt_root):
    return tiny_ckpt_root / "deepseek"


@pytest.fixture(scope="session")
def tiny_native_ckpt(tiny_ckpt_root):
    return tiny_ckpt_root / "native"


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A small synthetic shapes dataset (und, text, gen real + synthetic with VQ codes) and the
    tiny init checkpoint it was tokenised with, laid out as the tiny_demo recipe expects."""
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint
    from janus_train.training.assets import build_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    make_tiny_checkpoint(root / "tiny_init", fmt="hf", seed=0)
    build_shapes_dataset(root, root / "tiny_init", num_samples=240, image_size=96, seed=0, workers=2)
    return root
