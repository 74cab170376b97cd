"""Loss curve of a training run in stages (each stage's metrics.jsonl), against the tokens seen in all.

    python scripts/plot_training.py docs/training/gpu_stage1_metrics.jsonl docs/training/gpu_stage2_metrics.jsonl \
        --labels "stage 1" "stage 2" --out docs/training_loss_gpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl of each stage, in order")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="Larimar training (rec CE through memory)")
    args = p.parse_args()
    labels = args.labels or [Path(m).stem for m in args.metrics]
    if len(labels) != len(args.metrics):
        p.error("give one label per metrics file")
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0.0
    for path, label in zip(args.metrics, labels):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        x = [offset + r["tokens_seen"] / 1e6 for r in rows]
        ax.plot(x, [r["rec"] for r in rows], label=f"{label} ({rows[-1]['step']} steps)")
        offset = x[-1]
    ax.set_xlabel("decoder tokens seen (millions)")
    ax.set_ylabel("CE (nats/token)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
