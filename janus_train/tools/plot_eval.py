"""Plot a run's evaluation curve: held-out accuracies and validation losses against steps.

    python -m janus_train.tools.plot_eval RUN_DIR [--out eval_curve.png] [--title TEXT]

Reads RUN_DIR/metrics.jsonl (the eval/<name> columns of the evaluated steps) and writes a PNG
with two panels: accuracies (und exact match overall and per attribute question, gen shape and
colour by the scorer) and per-task validation losses (JanusFlow: the flow and REPA losses in
place of the gen CE), with stage boundaries marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ACCURACIES = {"eval/und_acc": "und: exact answers", "eval/und_acc_color": "und: colour questions",
              "eval/und_acc_shape": "und: shape questions", "eval/gen_acc": "gen: shape and colour drawn"}
LOSSES = {"eval/loss_und": "und", "eval/loss_text": "text", "eval/loss_gen": "gen",
          "eval/loss_flow": "gen: flow (MSE)", "eval/loss_repa": "gen: REPA (1 - cos)"}  # JanusFlow


def plot(run_dir: Path, out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl has no evaluation (set eval.data and eval.every_steps)")
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series, ylabel in ((acc_ax, ACCURACIES, "held-out accuracy"), (loss_ax, LOSSES, "held-out loss (token-mean CE)")):
        for key, label in series.items():
            pts = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
        ends = [r["step"] for a, r in zip(rows, rows[1:]) if a.get("stage") != r.get("stage")]
        for x in ends:
            ax.axvline(x - 0.5, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    acc_ax.set_ylim(0, 1)
    fig.suptitle(title or f"{run_dir.name}: evaluation on held-out data (dotted: stage boundaries)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m janus_train.tools.plot_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", default="eval_curve.png")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        print(plot(Path(args.run_dir), Path(args.out), args.title))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: plotting needs matplotlib (pip install matplotlib, or the project's dev extra)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
