"""The embedded default: fine-tune the same model with SoFT and with SFT (same budget), then
print and plot held-out loss / next-token accuracy per exit.

    python -m soft_jax.demo [--config configs/demo.py] [--steps N] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from soft_jax.train import train
from soft_jax.train_config import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def per_exit_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per exit, loss and accuracy for every run."""
    names = list(results)
    exits = sorted(results[names[0]])
    head = "| exit | " + " | ".join(f"{n} loss | {n} acc" for n in names) + " |"
    rule = "|---:|" + "---:|---:|" * len(names)
    rows = [f"| {e} | " + " | ".join(f"{results[n][e]['loss']:.3f} | {results[n][e]['accuracy']:.3f}"
                                     for n in names) + " |" for e in exits]
    return "\n".join([head, rule, *rows])


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Held-out loss and accuracy per exit, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv=None) -> dict:
    """Run the SoFT and SFT twins, print the per-exit table, write results.json and a PNG."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    base = load_config_file(args.config)
    out = Path(args.out or base.workdir)
    t0 = time.perf_counter()
    results, walls = {}, {}
    for mode, name in (("soft", "SoFT"), ("sft", "SFT")):
        cfg = base.copy_and_resolve_references()
        cfg.mode, cfg.workdir = mode, str(out / mode)
        if args.steps:
            cfg.total_steps = args.steps
        print(f"\n== {mode.upper()}: {cfg.total_steps} steps, exits {tuple(cfg.exits)}, "
              f"work dir {cfg.workdir}", flush=True)
        t = time.perf_counter()
        results[name] = train(cfg)["eval"]
        walls[name] = time.perf_counter() - t
    table = per_exit_table(results)
    title = "Held-out GSM8K demo split: SoFT vs SFT, same steps"
    plot(results, out / "per_exit.png", title)
    summary = {"results": {n: {str(e): r for e, r in res.items()} for n, res in results.items()},
               "train_seconds": walls, "total_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(f"# {title}\n\n{table}\n\n![per-exit](per_exit.png)\n")
    print(f"\n{title}\n{table}\n\nwrote {out / 'per_exit.png'}, {out / 'results.json'}, "
          f"{out / 'report.md'} ({summary['total_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
