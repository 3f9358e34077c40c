"""Shared fixtures: tiny random checkpoints and the shapes dataset written to disk once per
test session, a runner that starts launch/train.py for real (plain python, torchrun or the
deepspeed launcher), and the reference training runs the engine tests compare against."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from janus_train.contracts.batch import TASK_ID, Doc
from janus_train.contracts.conversation import gen_prompt
from janus_train.inference.understand import prompt_ids

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")

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
    from janus_train.tools.demo_assets import build_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    make_tiny_checkpoint(root / "tiny_init", fmt="hf", seed=0)
    build_shapes_dataset(root, root / "tiny_init", num_samples=240, image_size=96, seed=0, workers=2)
    return root


@pytest.fixture(scope="session")
def flow_shapes_root(tmp_path_factory):
    """The shapes world for JanusFlow: a tiny release-layout init (flow_init), a small random
    diffusers VAE (vae) and shards whose gen samples hold that VAE's latents."""
    from janus_train.tools.demo_assets import build_shapes_dataset
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint
    from janus_train.training.tokenizer import tiny_vae

    root = tmp_path_factory.mktemp("flow_shapes")
    make_tiny_checkpoint(root / "flow_init", fmt="deepseek", family="janusflow", preset="janusflow_tiny", seed=0, init_std=0.02)
    torch.manual_seed(0)
    vae = tiny_vae(latent_channels=4, downsample=8, width=8, sample_size=64)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(str(root / "vae"))
    build_shapes_dataset(root, root / "flow_init", num_samples=160, image_size=96, seed=0, workers=2, vae=root / "vae")
    return root


# ---- training runs through the real entry point ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Quiet runs (no bar, W&B, samples, evaluation), in process, on ready-made data.
QUIET = [
    "eval.data=null",
    "demo_assets.build=false",
    "logging.progress=false",
    "logging.wandb.enabled=false",
    "logging.sample_every=0",
    "data.num_workers=0",
]
# The engine tests' layout: stage 2 alone, 8 rows a step, the same rows for any dp size
# (`data.sharding=global`), a checkpoint every 2 steps (all kept: tests resume from several).
ENGINE_COMMON = [
    "train.stages.stage1.enabled=false",
    "train.stages.stage3.enabled=false",
    "train.stages.stage2.global_batch=8",
    "data.sharding=global",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=8",
    "checkpoint.export_hf=false",
    "parallel.zero_stage=2",
    "parallel.dtype=fp32",
]


def base_overrides(root: Path, run_dir: Path, steps=(2, 2, 2)) -> list[str]:
    """The demo recipe with the tiny model on the session's shapes data, quiet."""
    return [
        "+recipe=tiny_demo",
        "model=tiny",
        f"data.root={root}",
        f"model.init_from={root / 'tiny_init'}",
        f"run_dir={run_dir}",
        *QUIET,
        f"train.stages.stage1.steps={steps[0]}",
        f"train.stages.stage2.steps={steps[1]}",
        f"train.stages.stage3.steps={steps[2]}",
    ]


ENGINE_STEPS = 8


def engine_overrides(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """The engine tests' run (ENGINE_COMMON): und:text:gen 2:3:5, 8 steps, ZeRO-2, fp32."""
    return [*base_overrides(root, run_dir, steps=(1, ENGINE_STEPS, 1)), *ENGINE_COMMON, "train.stages.stage2.ratio=2:3:5", *extra]


FLOW_ENGINE_STEPS = 4


def flow_engine_overrides(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """`engine_overrides` for JanusFlow: the janusflow_tiny_demo recipe on the session's
    `flow_shapes_root`, quiet, ENGINE_COMMON, und:text:gen 2:1:5, 4 steps, one row per
    micro-step."""
    return [
        "+recipe=janusflow_tiny_demo",
        "model=janusflow_tiny",
        f"data.root={root}",
        f"model.init_from={root / 'flow_init'}",
        f"model.vae={root / 'vae'}",
        f"run_dir={run_dir}",
        *QUIET,
        *ENGINE_COMMON,
        f"train.stages.stage2.steps={FLOW_ENGINE_STEPS}",
        "train.stages.stage2.ratio=2:1:5",
        "train.micro_batch_rows=1",
        *extra,
    ]


def run_train(overrides: list[str], nproc: int = 1, launcher: str = "python", timeout: int = 900, env: dict | None = None, wait: bool = True, log_path: str | None = None):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    full_env.update(env or {})
    if launcher == "python":
        cmd = [sys.executable, TRAIN, *overrides]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), TRAIN, *overrides]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port()), TRAIN, *overrides]
    else:
        raise ValueError(launcher)
    if not wait:
        # Output goes to a file: an unread pipe fills up and blocks the ranks mid-step.
        log = open(log_path or os.devnull, "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=REPO, start_new_session=True)
        proc.log_path = log_path
        return proc
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def checked_run(overrides: list[str], nproc: int = 1, launcher: str = "python", timeout: int = 900):
    r = run_train(overrides, nproc=nproc, launcher=launcher, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"launch/train.py ({launcher}, {nproc} ranks) exited {r.returncode}:\n{(r.stdout + r.stderr)[-6000:]}")
    return r


def wait_for(pred, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll `pred` until true; fail with the run's log tail if the run exits first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            out = open(proc.log_path).read() if getattr(proc, "log_path", None) else ""
            raise AssertionError(f"training exited early with {proc.returncode}:\n{out[-4000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def signal_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 300) -> None:
    """Signal the launcher and every rank (as a scheduler would), then wait until no process of
    the group is left: the launcher may exit before its ranks."""
    os.killpg(proc.pid, sig)
    proc.wait(timeout=timeout)
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("ranks did not exit after the signal")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def trainer_tools():
    return types.SimpleNamespace(base=base_overrides, engine=engine_overrides, flow_engine=flow_engine_overrides, run=run_train, checked=checked_run, metrics=read_metrics,
                                 wait_for=wait_for, signal_group=signal_group)


class ReferenceRuns:
    """The session's uninterrupted engine runs (`engine_overrides`), each trained on first use."""

    def __init__(self, root: Path, tmp: Path):
        self.root, self.tmp = root, tmp

    @functools.cached_property
    def one_rank(self) -> Path:
        run_dir = self.tmp / "one_rank"
        checked_run(engine_overrides(self.root, run_dir))
        return run_dir

    @functools.cached_property
    def two_ranks(self) -> Path:
        """2 ranks under the real deepspeed launcher, ZeRO-2."""
        run_dir = self.tmp / "two_ranks"
        checked_run(engine_overrides(self.root, run_dir), nproc=2, launcher="deepspeed")
        return run_dir


@pytest.fixture(scope="session")
def reference_runs(shapes_root, tmp_path_factory) -> ReferenceRuns:
    return ReferenceRuns(shapes_root, tmp_path_factory.mktemp("reference_runs"))


@pytest.fixture(scope="session")
def eval_data(shapes_root, tmp_path_factory) -> Path:
    """Held-out shapes data (und, text, gen pre-tokenised with the tiny init) and its eval.yaml."""
    from janus_train.tools.demo_assets import EVAL_YAML, build_shapes_dataset

    root = tmp_path_factory.mktemp("eval_data")
    build_shapes_dataset(root, shapes_root / "tiny_init", num_samples=8, image_size=96, seed=77, workers=1, held_out=24)
    for sub in ("und", "text", "gen_real", "gen_synthetic"):  # only the held-out split is needed
        import shutil

        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "eval.yaml").write_text(EVAL_YAML.format(root=root))
    return root


# ---- document builders for model and step tests (the data pipeline has its own, fuller tokeniser) ----


def _doc(key: str, task: str, ids: list[int], first_target: int, gen_start: int | None = None, pixels=None) -> Doc:
    target = np.zeros(len(ids), dtype=bool)
    target[first_target:] = True
    return Doc(key=key, task=TASK_ID[task], ids=np.asarray(ids, dtype=np.int32), target=target,
               gen_start=len(ids) if gen_start is None else gen_start, pixels=pixels)


def _text_doc(ids: list[int], key: str = "text") -> Doc:
    return _doc(key, "text", ids, first_target=1)


def _und_doc(tok, question: str, answer: str, image: torch.Tensor, num_image_tokens: int, key: str = "und") -> Doc:
    prompt = prompt_ids(tok, num_image_tokens, question, system=None)
    ans = tok(" " + answer + tok.eos_token, add_special_tokens=False).input_ids
    return _doc(key, "und", prompt + ans, first_target=len(prompt), pixels=image[None])


def _gen_doc(tok, caption: str, codes: list[int], key: str = "gen") -> Doc:
    prompt = tok(gen_prompt(caption)).input_ids
    return _doc(key, "gen", prompt + codes, first_target=len(prompt), gen_start=len(prompt))


@pytest.fixture
def docs():
    return types.SimpleNamespace(text=_text_doc, und=_und_doc, gen=_gen_doc)
