#!/usr/bin/env bash
# One GPU acceptance command (issue 15 item 6): flash-attn varlen vs SDPA parity in bf16, a
# janus_pro_1b train step (tokens/s, MFU, peak memory next to memory_plan's prediction) and the
# transformers baseline's step (the ratio). What each part measures: bench/gpu_check.py.
#
#   bash bench/gpu_check.sh             # on one H100/H200, under 10 minutes
#   bash bench/gpu_check.sh --dry-run   # on CPU: the script's own plumbing at tiny size
#   bash bench/gpu_check.sh --help
#
# stdout: exactly one JSON object; logs: stderr. Exit status 0 ok, 1 a part failed, 2 cannot
# start (no CUDA device without --dry-run).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# The project's virtual environment when there is one (the README's `make install`), else the
# python on PATH; PYTHON overrides both.
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi
exec "$py" bench/gpu_check.py "$@"
