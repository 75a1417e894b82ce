"""PNG plots of a run, from its metrics.jsonl: loss curves, the expert-load heatmap per layer, routing
stability (flip rate and selection margin per layer, `train/health.py`) and, in a distributed run, each rank's
own work per logging window (`parallel/watch.py`)."""

from __future__ import annotations

from pathlib import Path

from behemoth.runlog import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png, expert_load.png, routing_stability.png and ranks.png next to metrics.jsonl; returns the files
    written.

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
    if any("margin" in layer for r in routing for layer in r["layers"]):
        written.append(plot_routing_stability(routing, run_dir / "routing_stability.png", plt))
    ranks = [r for r in records if r.get("type") == "ranks"]
    if ranks:
        written.append(plot_ranks(ranks, [r for r in records if r.get("event") == "straggler"], run_dir / "ranks.png",
                                  plt))
    return written


def plot_ranks(ranks: list[dict], warnings: list[dict], out: Path, plt) -> Path:
    """Seconds of each rank's own work (input wait and optimizer update) per logging window, with the window's wall
    time: one line per rank up to 16 ranks, else the median and the slowest rank; crosses mark the straggler
    warnings. Only the windows of the run's latest world size (a run resumed on another number of processes has
    both). A straggler is the line that stays above the others."""
    import numpy as np

    world = ranks[-1].get("world", len(ranks[-1].get("local_s", ())))
    ranks = [r for r in ranks if r.get("world", len(r.get("local_s", ()))) == world]
    steps = [r["step"] for r in ranks]
    fig, ax = plt.subplots(figsize=(7, 4))
    if world <= 16 and all("local_s" in r for r in ranks):
        local = np.array([r["local_s"] for r in ranks])  # [windows, world]
        for r in range(world):
            ax.plot(steps, local[:, r], marker=".", label=f"rank {r}")
    else:
        ax.plot(steps, [r["median_s"] for r in ranks], color="black", label="median rank")
        ax.plot(steps, [r["slowest_s"] for r in ranks], color="C3", marker=".", label="slowest rank")
    ax.plot(steps, [r["window_s"] for r in ranks], color="gray", alpha=0.5, linestyle="--", label="window wall time")
    for w in warnings:
        if w["step"] >= steps[0]:
            ax.plot(w["step"], w["local_s"], "x", color="red", markersize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds per logging window")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"each rank's own work (input wait + optimizer update), {world} ranks; x: straggler warning")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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


def plot_routing_stability(routing: list[dict], out: Path, plt) -> Path:
    """Two panels over the health reports, one line per MoE layer: the flip rate (share of the probe's routed
    slots that changed expert since the previous report) and the selection margin (biased score of the last
    chosen expert minus the best unchosen one's; dashed: the same on the unbiased logits).

    A settling router shows the flip rate falling and the margin growing; reports without a value (the first
    flip rate) are left out.
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, layer in enumerate(rec["layer"] for rec in routing[0]["layers"]):
        color = f"C{i % 10}"
        for ax, key, style in ((ax1, "flip_rate", "-"), (ax2, "margin", "-"), (ax2, "logit_margin", ":")):
            pts = [(r["step"], r["layers"][i][key]) for r in routing if r["layers"][i].get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color, marker=".",
                        label=f"layer {layer}" if key != "logit_margin" else None)
    ax1.set_ylabel("flip rate since previous report")
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("top-k selection margin (dotted: unbiased)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle("routing stability on a fixed probe batch")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
