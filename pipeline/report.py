"""Human-readable reports of a fit: the loss curve as PNG, the summary and iteration table."""

from __future__ import annotations

from typing import Any

__all__ = ["iteration_table", "loss_curve_png", "summary_markdown"]


def loss_curve_png(history: list[dict[str, Any]], path: str, title: str = "k-means loss") -> None:
    """Plot the loss per iteration (log scale) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    iterations = [rec["iteration"] for rec in history]
    losses = [rec["loss"] for rec in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        ax.plot(iterations, losses, marker="o", markersize=3)
        if min(losses) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (sum of squared distances)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def iteration_table(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per iteration: loss, relative change, changed labels, seconds."""
    return [
        {
            "iteration": rec["iteration"],
            "loss": rec["loss"],
            # a mini-batch record has neither: its loss is the batch's
            "relative_change": rec.get("relative_change"),
            "changed_labels": rec.get("changed_labels"),
            "seconds": round(rec["seconds"], 4),
        }
        for rec in history
    ]


def summary_markdown(model: dict[str, Any], output: str) -> str:
    """The markdown summary of a finished fit."""
    sizes = model["cluster_sizes"]
    size_text = ", ".join(f"{round(s)}" for s in sizes)
    params = model["parameters"]
    rows = [
        ("k", len(model["centers"])),
        ("rows", model["n_rows"]),
        ("features", ", ".join(model["features"])),
        ("inertia", f"{model['inertia']:.6g}"),
        ("iterations", model["n_iter"]),
        ("stop reason", model["stop_reason"]),
        ("converged", model["converged"]),
        ("init", _init_text(model.get("init"), params)),
        ("step", params.get("step")),
        ("cluster sizes", size_text),
        ("seconds", f"{model['seconds']['total']:.1f}"),
        ("model", f"`{output}/model.json`"),
        ("labels", f"`{output}/labels/`"),
        ("loss curve", f"`{output}/loss.png`"),
    ]
    lines = ["# k-means fit", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    """A markdown table cell: a '|' in a value (k-means||, a path) would end the cell."""
    return str(value).replace("|", "\\|")


def _init_text(init: dict[str, Any] | None, params: dict[str, Any]) -> str:
    if not init:  # a model written before the resolved init was recorded
        return f"{params.get('init')} (n_init={params.get('n_init')})"
    source = f" from `{init['from']}`" if "from" in init else ""
    return f"{init['method']}{source} (n_init={init['n_init']})"
