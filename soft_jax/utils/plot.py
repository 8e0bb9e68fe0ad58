"""PNG figures of per-exit results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_figure(path: Path, exits, series: dict[str, list[float]], ylabel: str, title: str,
                ylim=None, log_y: bool = False) -> Path:
    """One line per series over the exits (x: exit layer count); `log_y`: a log y axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.plot(exits, ys, marker="o", label=label)
    ax.set_xlabel("exit (number of layers)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(list(exits))
    if ylim is not None:
        ax.set_ylim(*ylim)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_exit_figure(results: dict[str, dict], path: Path, title: str) -> None:
    """Held-out loss and accuracy per exit, one line per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        exits = sorted(res)
        axes[0].plot(exits, [res[e]["loss"] for e in exits], "o-", label=name)
        axes[1].plot(exits, [res[e]["accuracy"] for e in exits], "o-", label=name)
    for ax, label in zip(axes, ("held-out loss (nats/token)", "next-token accuracy")):
        ax.set_xticks(sorted(next(iter(results.values()))))
        ax.set_xlabel("exit (layers used)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
