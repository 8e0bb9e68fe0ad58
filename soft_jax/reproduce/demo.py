"""The embedded default: fine-tune the same model with SoFT and with SFT (same budget), then
print and plot held-out loss / next-token accuracy per exit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections

from soft_jax.train.loop import train
from soft_jax.utils.plot import per_exit_figure
from soft_jax.utils.tables import markdown_table

TITLE = "Held-out GSM8K demo split: SoFT vs SFT, same steps"


def per_exit_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per exit, loss and accuracy for every run."""
    names = list(results)
    header = ["exit", *(f"{n} {m}" for n in names for m in ("loss", "acc"))]
    rows = [[e, *(f"{results[n][e][k]:.3f}" for n in names for k in ("loss", "accuracy"))]
            for e in sorted(results[names[0]])]
    return markdown_table(header, rows, "---:")


def run_demo(base: ml_collections.ConfigDict, out: Path, steps: int | None = None) -> dict:
    """Train the SoFT and SFT twins of `base` under `out`, print the per-exit table, write
    results.json, report.md and per_exit.png; returns the summary."""
    t0 = time.perf_counter()
    results, walls = {}, {}
    for mode, name in (("soft", "SoFT"), ("sft", "SFT")):
        cfg = base.copy_and_resolve_references()
        cfg.mode, cfg.workdir = mode, str(out / mode)
        if steps:
            cfg.total_steps = steps
        print(f"\n== {mode.upper()}: {cfg.total_steps} steps, exits {tuple(cfg.exits)}, "
              f"work dir {cfg.workdir}", flush=True)
        t = time.perf_counter()
        results[name] = train(cfg)["eval"]
        walls[name] = time.perf_counter() - t
    table = per_exit_table(results)
    per_exit_figure(results, out / "per_exit.png", TITLE)
    summary = {"results": {n: {str(e): r for e, r in res.items()} for n, res in results.items()},
               "train_seconds": walls, "total_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(f"# {TITLE}\n\n{table}\n\n![per-exit](per_exit.png)\n")
    print(f"\n{TITLE}\n{table}\n\nwrote {out / 'per_exit.png'}, {out / 'results.json'}, "
          f"{out / 'report.md'} ({summary['total_seconds']:.0f} s)")
    return summary
