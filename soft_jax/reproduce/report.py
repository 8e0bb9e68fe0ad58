"""Tables and figures of a `soft_jax.reproduce.stages` run: RUN/report.md and RUN/figures/*.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from soft_jax.eval.report import sortedness_figure
from soft_jax.reproduce.plan import EXITS, MODELS, STAGES, stage_path
from soft_jax.utils.plot import line_figure, per_exit_figure
from soft_jax.utils.tables import markdown_table


def _names(results: dict, key: str) -> list[str]:
    return [m for m, r in results["eval"].items() if key in r]


def loss_section(results: dict, figs: Path) -> list[str]:
    """Held-out loss / perplexity / next-token accuracy per exit and model."""

    names = _names(results, "loss")
    if not names:
        return []
    per = {m: results["eval"][m]["loss"]["per_exit"] for m in names}
    rows = [[e] + [f"{per[m][str(e)]['loss']:.3f} / {per[m][str(e)]['ppl']:.1f} / "
                   f"{per[m][str(e)]['accuracy']:.3f}" for m in names] for e in EXITS]
    per_exit_figure({MODELS[m]: {e: per[m][str(e)] for e in EXITS} for m in names},
         figs / "heldout_loss.png", "Held-out GSM8K (chat template): loss and accuracy per exit")
    n = results["eval"][names[0]]["loss"]["examples"]
    return [f"## Held-out loss / perplexity / next-token accuracy ({n} held-out problems, "
            "response tokens only)", "",
            markdown_table(["exit"] + [MODELS[m] for m in names], rows, "---:"), "",
            "![held-out loss](figures/heldout_loss.png)", ""]


def gsm8k_section(results: dict, figs: Path) -> list[str]:
    """Zero-shot greedy GSM8K accuracy (with counts) and ROUGE-L per exit and model."""

    names = _names(results, "gsm8k")
    if not names:
        return []
    acc = {m: results["eval"][m]["gsm8k"]["per_setting"]["0-shot"] for m in names}
    rouge = {m: results["eval"][m]["gsm8k"]["rouge_l"] for m in names}
    rows = [[e] + [f"{acc[m][str(e)]['correct']}/{acc[m][str(e)]['total']} / "
                   f"{rouge[m][str(e)]:.3f}" for m in names] for e in EXITS]
    line_figure(figs / "gsm8k_rouge.png", EXITS,
                {MODELS[m]: [rouge[m][str(e)] for e in EXITS] for m in names},
                "ROUGE-L F1 vs reference solution", "Greedy generations per exit")
    return ["## Greedy generations: GSM8K correct / total and ROUGE-L F1 per exit", "",
            markdown_table(["exit"] + [MODELS[m] for m in names], rows, "---:"), "",
            "![ROUGE-L](figures/gsm8k_rouge.png)", ""]


def sortedness_section(results: dict, figs: Path) -> list[str]:
    """Mean KL / cosine to the reference last layer per exit, and the heat maps."""
    analyses = {}
    for m in _names(results, "sortedness"):
        analyses.update(results["eval"][m]["sortedness"]["analyses"])
    if not analyses:
        return []
    kl_max = max(float(np.nanmax(np.asarray(a["kl"], float))) for a in analyses.values())
    lines = ["## Sorted-ness: mean over response positions of KL(p_last || p_exit) (nats) "
             "/ cosine of normed hidden states", ""]
    exits = next(iter(analyses.values()))["exits"]
    rows = []
    for i, e in enumerate(exits):
        row = [e]
        for a in analyses.values():
            kl = np.nanmean(np.asarray(a["kl"][i], float))
            cos = np.nanmean(np.asarray(a["cos"][i], float)) if a.get("cos") else float("nan")
            row.append(f"{kl:.2f} / {cos:.3f}")
        rows.append(row)
    lines += [markdown_table(["exit"] + list(analyses), rows, "---:"), ""]
    for name, a in analyses.items():
        fname = "sortedness_" + "".join(c if c.isalnum() else "_" for c in name.lower()) + ".png"
        sortedness_figure(figs / fname, a, name, kl_max=kl_max, cos_min=0.0)
        lines += [f"![{name}](figures/{fname})", ""]
    return lines


def _rows(dec: dict, mode: str, key: str) -> dict:
    """{model: {str(exit or threshold label): row}} of one mode of the decoding task."""
    return {m: {str(r[key]): r for r in d["rows"] if r["mode"] == mode} for m, d in dec.items()}


def _cell(r: dict) -> str:
    q = f"{r['correct']}/{r['total']}" if "correct" in r else f"{r['quality']:.2f}"
    return f"{q}, R-L {r['rouge_l']:.2f}"


def decode_section(results: dict, figs: Path) -> list[str]:
    """Batch-1 CPU decoding (the `decoding` eval task): exits alone, self-speculative drafts,
    dynamic exit."""

    dec = results.get("decode") or {}
    if not dec:
        return []
    any_ = next(iter(dec.values()))
    names = [MODELS.get(m, m) for m in dec]
    alone, spec = _rows(dec, "greedy", "exit"), _rows(dec, "speculative", "draft_exit")
    dyn = _rows(dec, "dynamic", "thresholds")
    lines = [f"## Decoding on CPU, batch 1 ({any_['prompts']} held-out prompts, up to "
             f"{any_['max_new_tokens']} new tokens, greedy; the `decoding` eval task)", ""]
    rows = [[e] + [f"{alone[m][str(e)]['ms_per_token']:.1f} ({_cell(alone[m][str(e)])})"
                   for m in dec] for e in EXITS]
    lines += ["Each exit alone: ms/token (GSM8K correct, ROUGE-L)", "",
              markdown_table(["exit"] + names, rows, "---:"), ""]
    rows = [[d] + [f"{spec[m][str(d)]['acceptance']:.2f} / {spec[m][str(d)]['speedup']:.2f}x"
                   for m in dec] for d in EXITS[:-1]]
    lines += ["Self-speculative decoding (draft exit d, verified by the full model; output "
              "asserted token-identical to greedy): acceptance rate / speedup over greedy", "",
              markdown_table(["draft exit"] + names, rows, "---:"), ""]
    full = str(EXITS[-1])
    rows = [[lab] + [f"{dyn[m][lab]['mean_exit_layer']:.1f} / {dyn[m][lab]['speedup']:.2f}x / "
                     f"{_cell(dyn[m][lab])}" for m in dec] for lab in dyn[next(iter(dec))]]
    rows.append(["greedy (full)"] + [f"{EXITS[-1]} / 1.00x / {_cell(alone[m][full])}"
                                     for m in dec])
    lines += ["Dynamic exit (thresholds: the paper's mapped by depth, or one uniform value): "
              "mean exit layer / speedup in ms per token / correct, ROUGE-L", "",
              markdown_table(["thresholds"] + names, rows, "---:"), ""]
    line_figure(figs / "speculative_speedup.png", EXITS[:-1],
                {MODELS.get(m, m): [spec[m][str(d)]["speedup"] for d in EXITS[:-1]]
                 for m in dec}, "speedup over greedy", "Self-speculative decoding")
    lines += ["![speculative speedup](figures/speculative_speedup.png)", ""]
    return lines


def write_report(run: Path, results: dict) -> Path:
    """RUN/report.md with every finished stage's table and figure."""
    figs = run / "figures"
    shutil.rmtree(figs, ignore_errors=True)
    figs.mkdir(parents=True)
    t = results["train"]
    walls = ", ".join(f"{m} {r['wall_s'] / 60:.1f} min" for m, r in t.items())

    missing = [" ".join(st[:3]) for st in STAGES
               if not stage_path(run, st[0], st[1], *st[2:3]).is_file()]
    md = ["# SoFT reproduction on SmolLM2-135M-Instruct", "",
          f"Budget per run: {results['size']}; training wall time: {walls or 'n/a'}.", "",
          f"Stages not done: {', '.join(missing) if missing else 'none'}.", ""]
    md += loss_section(results, figs) + gsm8k_section(results, figs)
    md += sortedness_section(results, figs) + decode_section(results, figs)
    out = run / "report.md"
    out.write_text("\n".join(md) + "\n")
    return out
