"""Turn a training run's summary.json + history.jsonl (from `python -m dsv4jax.train`) into
bench/results/<name>.json and the loss-curve PNG beside it. Runs on the CPU after the files came back.

    python bench/train_report.py --run RUN_DIR --name train-dsv4-tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(values)))
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="directory with summary.json and history.jsonl")
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    run = Path(args.run)
    summary = json.loads((run / "summary.json").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    steps = np.array([h["step"] for h in history])
    tokens_per_step = summary["train"]["batch_size"] * summary["train"]["seq_len"]
    main_loss = np.array([h["main_loss"] for h in history])
    mtp_loss = np.array([h["mtp_loss"] for h in history])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(1, len(history) // 100)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    x = steps[width - 1:] * tokens_per_step / 1e6
    ax.plot(x, _smooth(main_loss, width), label="train: next token")
    ax.plot(x, _smooth(mtp_loss, width), label="train: MTP (token t+2)", alpha=0.8)
    if "heldout_loss" in summary:
        ax.axhline(summary["heldout_loss"], color="k", linestyle="--", linewidth=1,
                   label=f"held-out, shipped checkpoint: {summary['heldout_loss']:.3f} "
                         f"(ppl {summary['heldout_perplexity']:.2f})")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(0, min(10.0, float(np.max(main_loss)) + 0.5))
    ax.set_title(f"{args.name}: {summary['parameters'] / 1e6:.1f}M params, {summary['steps']} steps on "
                 f"{summary['device']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = RESULTS / f"{args.name}-loss.png"
    fig.savefig(png)

    every = max(1, len(history) // 50)
    record = {"name": args.name, **summary, "loss_curve_png": png.name,
              "curve": [{k: h[k] for k in ("step", "main_loss", "mtp_loss", "max_violation", "learning_rate")}
                        for h in history[::every]]}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS / (args.name + '.json')} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
