"""PNG plots of a run, from its metrics.jsonl: loss curves, and the expert-load heatmap per layer."""

from __future__ import annotations

from pathlib import Path

from behemoth.runlog import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png and expert_load.png next to metrics.jsonl; returns the files written.

    Plotting is skipped (empty list) when matplotlib is missing or there is nothing to plot.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", alpha=0.4, label="lr")
        ax2.set_ylabel("learning rate", color="gray")
        ax.legend(loc="upper right")
        fig.tight_layout()
        written.append(run_dir / "loss.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    routing = [r for r in records if r.get("type") == "routing"]
    if routing:
        written.append(plot_expert_load(routing, run_dir / "expert_load.png", plt))
    return written


def plot_expert_load(routing: list[dict], out: Path, plt) -> Path:
    """One heatmap per MoE layer: expert (rows) x health report (columns), share of the layer's tokens.

    A balanced layer is a flat colour at 1/E; a collapsing one shows a bright row.
    """
    import numpy as np

    layers = [rec["layer"] for rec in routing[0]["layers"]]
    n = len(layers)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    steps = [r["step"] for r in routing]
    for i, layer in enumerate(layers):
        counts = np.array([r["layers"][i]["tokens"] for r in routing], dtype=float).T  # [E, reports]
        share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
        ax = axes[i // cols][i % cols]
        im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                       extent=(steps[0], steps[-1], share.shape[0] - 0.5, -0.5))
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("share of each layer's routed tokens per expert")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
