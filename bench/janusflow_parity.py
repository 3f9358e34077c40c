"""Our JanusFlow generation encoder/decoder against DeepSeek's own code, on the same weights.

    git clone https://github.com/deepseek-ai/Janus /path/to/Janus
    python bench/janusflow_parity.py --janus-repo /path/to/Janus [--width 64] [--seed 0]

Imports `janus/janusflow/models/uvit.py` from your checkout (nothing of it is copied here),
builds its ShallowUViTEncoder/Decoder at the given width with the release's layout (2x2
patchify, two ConvNeXt blocks each side, one unpatchify), checks that both sides have the same
state-dict keys and shapes, loads our random weights into theirs, and prints the largest
difference of the encoder's tokens, its time embedding and the decoder's velocity. Exit 1 if
the keys differ or a difference exceeds --tol (relative to the output's largest value).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from janus_train.models.janusflow.config import FlowConfig  # noqa: E402
from janus_train.models.janusflow.uvit import FlowDecoder, FlowEncoder  # noqa: E402


def load_reference(janus_repo: Path):
    path = janus_repo / "janus" / "janusflow" / "models" / "uvit.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --janus-repo must be a checkout of deepseek-ai/Janus")
    # uvit.py imports torchvision at the top without using it for these classes; diffusers and
    # transformers probe for torchvision themselves, so import them before standing it in.
    import diffusers.models.embeddings  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.utils = types.ModuleType("torchvision.utils")
        sys.modules.update({"torchvision": tv, "torchvision.utils": tv.utils})
    spec = importlib.util.spec_from_file_location("deepseek_janusflow_uvit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--janus-repo", type=Path, required=True, help="checkout of github.com/deepseek-ai/Janus")
    p.add_argument("--width", type=int, default=64, help="ConvNeXt width (the release: 768)")
    p.add_argument("--llm-hidden", type=int, default=128, help="LLM width, the time embedding's size (the release: 2048)")
    p.add_argument("--latent", type=int, default=16, help="latent side (the release: 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-5, help="largest allowed relative difference")
    a = p.parse_args(argv)
    ref = load_reference(a.janus_repo)
    torch.manual_seed(a.seed)
    fl = FlowConfig(width=a.width)
    ours_enc, ours_dec = FlowEncoder(fl, a.llm_hidden), FlowDecoder(fl, a.llm_hidden)
    ref_enc = ref.ShallowUViTEncoder(input_channels=fl.latent_channels, stride=fl.patch_size, kernel_size=fl.kernel_size,
                                     block_out_channels=(fl.width,), layers_in_middle=fl.encoder_blocks, hidden_size=a.llm_hidden,
                                     norm_eps=fl.norm_eps)
    ref_dec = ref.ShallowUViTDecoder(in_channels=fl.width, out_channels=fl.latent_channels, block_out_channels=(fl.width,), upsamples=1,
                                     layers_in_middle=fl.decoder_blocks, hidden_size=a.llm_hidden, norm_eps=fl.norm_eps)
    for ours, theirs in ((ours_enc, ref_enc), (ours_dec, ref_dec)):
        with torch.no_grad():  # non-trivial values everywhere, GRN scales included (zero at init)
            for prm in ours.parameters():
                prm.copy_(torch.randn_like(prm) * 0.2)
        a_sd, b_sd = ours.state_dict(), theirs.state_dict()
        diff = sorted(set(a_sd) ^ set(b_sd)) + sorted(k for k in set(a_sd) & set(b_sd) if a_sd[k].shape != b_sd[k].shape)
        if diff:
            print(json.dumps({"keys_differ": diff[:10]}))
            return 1
        theirs.load_state_dict(a_sd)
        ours.eval()
        theirs.eval()
    z = torch.randn(4, fl.latent_channels, a.latent, a.latent)
    t = torch.rand(4) * 1000
    with torch.no_grad():
        tok_a, temb_a, skip_a = ours_enc(z, t)
        tok_b, temb_b, hs_b = ref_enc(z, t)
        grid = torch.randn_like(tok_a)
        v_a = ours_dec(grid, skip_a, temb_a)
        v_b = ref_dec(grid, list(hs_b), temb_b)
    out = {}
    ok = True
    for name, x, y in (("encoder_tokens", tok_a, tok_b), ("time_embedding", temb_a, temb_b), ("velocity", v_a, v_b)):
        d = float((x - y).abs().max())
        rel = d / max(float(y.abs().max()), 1e-12)
        out[name] = {"max_abs_diff": d, "relative": rel, "max_abs": float(y.abs().max())}
        ok &= rel <= a.tol
    print(json.dumps({"width": a.width, "latent": a.latent, **out, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
