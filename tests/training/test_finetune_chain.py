"""docs/finetune.md's tiny-size chain, run as written: release -> convert -> shards from LLaVA,
ms-swift, ShareGPT and a captioned folder -> LoRA fine-tune (+recipe=tiny_finetune, 2 ranks under
the real deepspeed launcher) -> eval -> merged hf and peft exports -> chat, generate; then the
exports are loaded by real clients (transformers, peft) and compared.

The block is taken from the doc itself, so the doc cannot drift from what works. The only
change made to it: the deepspeed launcher gets a free --master_port (tests run side by side).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "finetune.md"
MARK = "<!-- doc-test: skip (run end to end, as written, by tests/training/test_finetune_chain.py) -->"


def chain_block() -> str:
    text = DOC.read_text()
    at = text.index(MARK)
    m = re.compile(r"```bash\n(.*?)```", re.S).search(text, at)
    assert m is not None, f"no bash block after the {MARK} marker in {DOC}"
    return m.group(1)


def test_block_is_the_documented_chain():
    block = chain_block()
    for needed in ("make_tiny_checkpoint", "--src-format deepseek", "llava.json", "swift.jsonl", "sharegpt.json", "captions",
                   "pretokenize_vq", "+recipe=tiny_finetune", "janus_train.eval", "--dst-format hf", "--dst-format peft",
                   "janus_train.chat", "janus_train.generate"):
        assert needed in block, needed


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    from tests.conftest import free_port

    root = tmp_path_factory.mktemp("finetune_chain")
    (root / "launch").symlink_to(ROOT / "launch")  # the block runs ../launch/train.py from tiny_chain/
    script = chain_block().replace("deepspeed --num_gpus", f"deepspeed --master_port {free_port()} --num_gpus")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", WANDB_MODE="offline")
    r = subprocess.run(["bash", "-euxo", "pipefail", "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    (root / "chain.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return root / "tiny_chain"


def test_shards_from_each_format(chain):
    for sub, n in (("und", 16), ("text", 16), ("gen", 8), ("gen_vq", 8), ("heldout/und", 8)):
        report = json.loads((chain / "my_shards" / sub / "build_report.json").read_text())
        assert report["written"] == n and not report["skipped"], (sub, report)


def test_lora_run_trained_and_saved_only_adapters(chain):
    run = chain / "runs" / "tiny_lora"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    files = {p.name for p in (last / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "base.json"} <= files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files), files


def test_eval_report(chain):
    report = json.loads((chain / "eval" / "tiny_lora" / "report.json").read_text())
    assert report, "empty eval report"


def test_chat_and_generate_ran(chain):
    log = (chain.parent / "chain.log").read_text()
    assert "janus_train.chat" in log
    assert list((chain / "samples").glob("*.png"))


def test_exports_load_in_transformers_and_peft(chain):
    import torch
    from peft import PeftModel
    from transformers import JanusForConditionalGeneration

    merged = JanusForConditionalGeneration.from_pretrained(chain / "my_model_hf").eval()
    base = JanusForConditionalGeneration.from_pretrained(chain / "tiny_release").eval()
    lora = PeftModel.from_pretrained(base, chain / "my_adapter").eval()
    ids = torch.arange(3, 40).unsqueeze(0) % merged.config.text_config.vocab_size
    with torch.no_grad():
        a = merged(input_ids=ids).logits
        b = lora(input_ids=ids).logits
        plain = JanusForConditionalGeneration.from_pretrained(chain / "tiny_release").eval()(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - plain).abs().max().item() > 1e-4, "the fine-tune changed nothing"
