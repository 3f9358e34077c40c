"""ZeRO-3 start-up (parallel/zero3_init.py): parameters created partitioned on 2 ranks get
exactly the dense build's weights, from the seeded init (gathered a module at a time) and from
a memory-mapped checkpoint (each rank copies its slices)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import torchrun

WORKER = Path(__file__).with_name("zero3_init_worker.py")


@pytest.mark.parametrize("preset", ["tiny", "janusflow_tiny"])
def test_partitioned_build_matches_dense(preset, tmp_path):
    torchrun(2, WORKER, preset, str(tmp_path), timeout=600)


def test_memory_mapped_read_equals_a_full_read(tiny_native_ckpt):
    import torch

    from janus_train.checkpoint.io import read_checkpoint

    _, full = read_checkpoint(tiny_native_ckpt)
    _, mapped = read_checkpoint(tiny_native_ckpt, mmap=True)
    assert set(full) == set(mapped) and all(torch.equal(full[k], mapped[k]) for k in full)
