"""The human-readable side of an eval: report.md with per-exit tables and PNG figures
(matplotlib, Agg backend) with labelled axes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from soft_jax.eval.decoding import DRIFT_WARN
from soft_jax.utils.plot import line_figure, pyplot
from soft_jax.utils.tables import markdown_table


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_").lower()


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


# ------------------------------------------------------------------------------ figures
def loss_figure(path: Path, exits, per_exit: dict, title: str) -> Path:
    """Loss and perplexity per exit, side by side."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    loss = [per_exit[str(e)]["loss"] for e in exits]
    ppl = [per_exit[str(e)]["ppl"] for e in exits]
    a1.plot(exits, loss, marker="o")
    a1.set_ylabel("cross-entropy (nats / target token)")
    a1.set_title("loss per exit")
    a2.plot(exits, ppl, marker="o", color="tab:orange")
    a2.set_ylabel("perplexity")
    if max(ppl) > 20 * min(ppl):
        a2.set_yscale("log")
    else:
        a2.ticklabel_format(axis="y", useOffset=False, style="plain")
    a1.ticklabel_format(axis="y", useOffset=False, style="plain")
    a2.set_title("perplexity per exit")
    for ax in (a1, a2):
        ax.set_xlabel("exit (number of layers)")
        ax.set_xticks(list(exits))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(ax, values, row_labels, col_labels, cmap, cbar_label, vmin=None, vmax=None,
            annotate=None):
    """imshow with labelled ticks and a colorbar; `annotate[i][j]` strings drawn in cells."""
    arr = np.asarray(values, float)
    im = ax.imshow(np.ma.masked_invalid(arr), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(row_labels)), row_labels)
    step = max(1, len(col_labels) // 10)
    ax.set_xticks(range(0, len(col_labels), step), [col_labels[i] for i in
                                                     range(0, len(col_labels), step)])
    cb = ax.figure.colorbar(im, ax=ax)
    cb.set_label(cbar_label)
    if annotate is not None:
        for i, row in enumerate(annotate):
            for j, text in enumerate(row):
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black")
    return im


def sortedness_figure(path: Path, analysis: dict, title: str, kl_max: float | None = None,
                      cos_min: float | None = None) -> Path:
    """KL and cosine heat maps (exit x response position) of one analysis; pass the same
    kl_max / cos_min to several figures to share their colour scales."""
    plt = pyplot()
    has_cos = analysis.get("cos") is not None
    fig, axes = plt.subplots(1, 2 if has_cos else 1, figsize=(12 if has_cos else 6.5, 4.2),
                             squeeze=False)
    rows = [f"layer {e}" for e in analysis["exits"]]
    cols = [str(p) for p in range(analysis["positions"])]
    ax = axes[0][0]
    heatmap(ax, analysis["kl"], rows, cols, "viridis", "KL(p_ref || p_exit), nats", vmin=0,
            vmax=kl_max)
    ax.set_title("KL divergence from the reference")
    if has_cos:
        ax2 = axes[0][1]
        heatmap(ax2, analysis["cos"], rows, cols, "magma", "cosine similarity", vmin=cos_min,
                vmax=1)
        ax2.set_title("cosine of normed hidden states")
    for a in axes[0]:
        a.set_xlabel("response position")
        a.set_ylabel("exit (number of layers)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pairwise_figure(path: Path, pw: dict) -> Path:
    """Score heat map (rows: model A exits, cols: model B exits), cells annotated W/L/T."""
    plt = pyplot()
    m = pw["matrix"]
    rows, cols = m["rows"], m["cols"]
    score = [[m["cells"][r][c]["score"] for c in cols] for r in rows]
    notes = [[f"{m['cells'][r][c]['score']:+.2f}\n{m['cells'][r][c]['wins']:g}/"
              f"{m['cells'][r][c]['losses']:g}/{m['cells'][r][c]['ties']:g}" for c in cols]
             for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 3, 0.8 * len(rows) + 2.2))
    heatmap(ax, score, [f"layer {r}" for r in rows], [f"layer {c}" for c in cols], "RdBu",
            f"score = (W - L) / total, {pw['a']} vs {pw['b']}", vmin=-1, vmax=1, annotate=notes)
    ax.set_xlabel(f"{pw['b']} exit")
    ax.set_ylabel(f"{pw['a']} exit")
    ax.set_title(f"pairwise: {pw['a']} (rows) vs {pw['b']} (cols), W/L/T per cell\n"
                 f"judge: {pw['judge']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ markdown
def _gsm8k_cells(c: dict) -> list[str]:
    """Our accuracy (correct/total), then lm-eval's strict-match and flexible-extract."""
    return [f"{_fmt(c['accuracy'])} ({c['correct']}/{c['total']})",
            _fmt(c.get("lm_eval_strict_match")), _fmt(c.get("lm_eval_flexible_extract"))]


def _header(results: dict) -> list[str]:
    m = results["model"]
    md = [f"# Eval report: {m['name']}", "",
          f"- model: {m['source']} ({m['num_layers']} layers, hidden {m['hidden_size']}, "
          f"vocab {m['vocab_size']})",
          f"- exits evaluated: {', '.join(map(str, results['exits']))} (each exit = the first "
          "n layers + the shared final norm + LM head)",
          f"- tasks: {', '.join(results['tasks'])}; total time {results.get('seconds', 0)} s"]
    if "second_model" in results:
        s = results["second_model"]
        md.append(f"- second model: {s['name']}: {s['source']} ({s['num_layers']} layers), "
                  f"exits {', '.join(map(str, s['exits']))}")
    return md + [""]


def loss_section(r: dict, exits, name: str, out: Path) -> list[str]:
    """Loss / perplexity / accuracy per exit, and its figure."""
    cut = f", {r['truncated']} truncated to {r['seq_len']} tokens" if r.get("truncated") else ""
    loss_figure(out / "loss_per_exit.png", exits, r["per_exit"], f"{name} on {r['source']}")
    return ["## Loss / perplexity per exit", "",
            f"Data: `{r['source']}` ({r['format']} format, prompt tokens masked), "
            f"{r['examples']} examples, {r['tokens']} target tokens{cut}.", "",
            markdown_table(["exit", "loss (nats/token)", "perplexity", "next-token accuracy"],
                           [[str(e), _fmt(r["per_exit"][str(e)]["loss"], 4),
                             _fmt(r["per_exit"][str(e)]["ppl"], 2),
                             _fmt(r["per_exit"][str(e)]["accuracy"])] for e in exits]), "",
            "![loss per exit](loss_per_exit.png)", ""]


def gsm8k_section(r: dict, exits, name: str, out: Path) -> list[str]:
    """GSM8K accuracy per exit and setting, three scorers, and its figure."""
    settings = list(r["per_setting"])
    line_figure(out / "gsm8k_accuracy.png", exits,
                {s: [r["per_setting"][s][str(e)]["accuracy"] for e in exits] for s in settings},
                "accuracy", f"GSM8K accuracy per exit ({name})", ylim=(-0.02, 1.02))
    return ["## GSM8K accuracy per exit", "",
            f"Data: `{r['source']}`, {r['examples']} problems; greedy, at most "
            f"{r['max_new_tokens']} new tokens, cut at the next `Question:`; few-shot "
            f"exemplars: the first k rows of `{r['few_shot_source']}`. Per-example outputs: "
            f"`{r['predictions']}`.", "",
            "Three scores of the same generations: **ours** (lenient: the number after "
            "`####`, else the last number, canonicalised so `$1,000.00` == `1000`), and "
            "lm-evaluation-harness's **strict-match** (the first `#### N` only) and "
            "**flexible-extract** (the last number-like run), with lm-eval's exact match; "
            "the lm-eval columns are the ones comparable with published lm-eval GSM8K "
            "figures.", "",
            markdown_table(["exit"] + [f"{s} {col}" for s in settings
                                       for col in ("ours", "strict-match", "flexible-extract")],
                           [[str(e)] + [x for s in settings for x in _gsm8k_cells(
                               r["per_setting"][s][str(e)])] for e in exits]), "",
            "![GSM8K accuracy](gsm8k_accuracy.png)", ""]


def triviaqa_section(r: dict, exits, name: str, out: Path) -> list[str]:
    """TriviaQA exact match per exit (case-sensitive and normalised), and its figure."""
    em = {k: [r["per_exit"][str(e)][k] for e in exits]
          for k in ("em_case_sensitive", "em_normalized")}
    line_figure(out / "triviaqa_em.png", exits,
                {"EM case-sensitive": em["em_case_sensitive"],
                 "EM normalised": em["em_normalized"]},
                "exact match", f"TriviaQA EM per exit ({name})", ylim=(-0.02, 1.02))
    return ["## TriviaQA exact match per exit", "",
            f"Data: `{r['source']}`, {r['examples']} questions, {r['shots']}-shot; greedy, at "
            f"most {r['max_new_tokens']} new tokens; prediction = first line of the output. "
            "Case-sensitive EM (the paper's) and normalised EM (the official TriviaQA "
            "normaliser: lowercase, punctuation and `_` to spaces, articles removed), both "
            "against all aliases.", "",
            markdown_table(["exit", "EM case-sensitive (paper)", "EM normalised"],
                           [[str(e), _fmt(a), _fmt(b)] for e, a, b in
                            zip(exits, em["em_case_sensitive"], em["em_normalized"])]), "",
            "![TriviaQA EM](triviaqa_em.png)", ""]


def generate_section(r: dict, exits, name: str, out: Path) -> list[str]:
    """Where the generations are, and the first prompt's output per exit."""
    return ["## Generation per exit", "",
            f"Greedy generations for {r['examples']} prompts of `{r['source']}` "
            f"({r['format']} format), at most {r['max_new_tokens']} new tokens, saved in "
            f"`{r['file']}` (one JSON line per prompt and exit: prompt, exit, output).", "",
            "First prompt's output per exit:", "",
            markdown_table(["exit", "output (first 120 characters)"],
                           [[str(e), r["first_output_per_exit"][str(e)][:120].replace("\n", " ")
                             .replace("|", "\\|")] for e in exits]), ""]


def pairwise_section(r: dict, exits, name: str, out: Path) -> list[str]:
    """The judge, the win / loss / tie matrix, and its figure."""
    offline = "not PandaLM" in r["judge"]
    pairwise_figure(out / "pairwise_score.png", r)
    return ["## Pairwise comparison (PandaLM protocol)", "",
            f"**Judge: {r['judge']}.**" + (" This is an offline stand-in, not a language "
                                           "model judge: numbers are not comparable with "
                                           "the paper's PandaLM numbers." if offline else ""),
            "",
            f"{r['examples']} instructions; every pair judged in both orders, each order "
            f"counting half; cells are {r['a']}'s wins / losses / ties against {r['b']} "
            "and (score = (W - L) / total). Matrix as JSON: `pairwise.json`.", "",
            r["table_markdown"], "", "![pairwise score](pairwise_score.png)", ""]


def sortedness_section(r: dict, exits, name: str, out: Path) -> list[str]:
    """KL / cosine per exit and position: a table and a heat map per analysis, one scale."""
    md = ["## Sorted-ness analysis", "",
          f"{r['sequences']} prompts of `{r['source']}`, response positions 0.."
          f"{r['positions'] - 1}; {r['response_description']}. KL = {r['kl_definition']};"
          f" cosine = {r['cos_definition']}. Averaged over the prompts whose response "
          "reaches the position. Data: `sortedness.json`.", ""]
    md += [f"- {n}" for n in r.get("notes", [])]
    kls = [np.asarray(a["kl"], float) for a in r["analyses"].values()]
    coss = [np.asarray(a["cos"], float) for a in r["analyses"].values()
            if a.get("cos") is not None]
    kl_max = max((float(np.nanmax(k)) for k in kls if np.isfinite(k).any()), default=None)
    cos_min = min((float(np.nanmin(c)) for c in coss if np.isfinite(c).any()), default=None)
    if len(r["analyses"]) > 1:
        md += ["All sorted-ness heat maps share one KL and one cosine colour scale.", ""]
    for title, a in r["analyses"].items():
        fname = f"sortedness_{_slug(title)}.png"
        sortedness_figure(out / fname, a, title, kl_max or None, cos_min)
        kl = np.asarray(a["kl"], float)
        cos = None if a.get("cos") is None else np.asarray(a["cos"], float)
        md += [f"### {title}", "",
               markdown_table(["exit", "mean KL over positions", "mean cosine over positions"],
                              [[str(e), _fmt(float(np.nanmean(kl[i]))),
                                "n/a" if cos is None else _fmt(float(np.nanmean(cos[i])))]
                               for i, e in enumerate(a["exits"])]), "",
               f"![{title}]({fname})", ""]
    return md


def decoding_table(rows: list[dict]) -> str:
    """The speed table: one row per decoding configuration."""
    head = ["mode", "exit / draft", "ms/token", "speedup", "quality", "rejection ratio",
            "mean exit layer", "identical to greedy"]
    return markdown_table(head, [[
        r["mode"] + (f" ({r['thresholds']})" if r.get("thresholds") else ""),
        str(r.get("draft_exit", r.get("exit"))), f"{r['ms_per_token']:.1f}",
        f"{r['speedup']:.2f}x", f"{r['metric']} {r['quality']:.3f}",
        "-" if r["rejection_ratio"] is None else f"{r['rejection_ratio']:.2f}",
        f"{r['mean_exit_layer']:.1f}", "yes" if r["identical_to_greedy"] else "no"]
        for r in rows])


def _drift_note(r: dict) -> str:
    """How far the baseline timed last moved from the one timed first (older results: none)."""
    if "baseline_drift" not in r:
        return ""
    return (f" Full greedy timed again after every row: {r['baseline_ms_per_token_last']:.1f} "
            f"ms/token ({r['baseline_drift']:.2f}x the first"
            + ("; the load changed, so read the speedups as unreliable)" if
               abs(r["baseline_drift"] - 1) > DRIFT_WARN else ")") + ".")


def decoding_section(r: dict, exits, name: str, out: Path) -> list[str]:
    """The decoding speed table (greedy / speculative / dynamic) and its figure."""
    return ["## Decoding speed (greedy, batch 1)", "",
            f"Prompts: the first {r['prompts']} of `{r['source']}` ({r['format']}), up to "
            f"{r['max_new_tokens']} new tokens; speedup = full-model greedy ms/token "
            f"({r['baseline_ms_per_token']:.1f}, same process) / the row's; dynamic rows "
            "\"a:L\" exit between layer a and L at the given thresholds (paper = the paper's, "
            "mapped by relative depth)." + _drift_note(r), "",
            decoding_table(r["rows"]), "", "![decoding](decoding.png)", ""]


SECTIONS = {"loss": loss_section, "gsm8k": gsm8k_section, "triviaqa": triviaqa_section,
            "generate": generate_section, "pairwise": pairwise_section,
            "sortedness": sortedness_section, "decoding": decoding_section}  # report order


def write_report(results: dict, out: Path) -> Path:
    """report.md (+ figures) from a results dict produced by runner.run_eval: a header, then
    one section per task present in `results`."""
    out = Path(out)
    md = _header(results)
    for task, section in SECTIONS.items():
        if task in results:
            md += section(results[task], results["exits"], results["model"]["name"], out)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
