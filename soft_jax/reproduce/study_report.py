"""Tables and figures of a recipe study run dir: RUN/study_report.md and RUN/figures/*.png,
including the self-speculation speedup *projected* for LLaMA-2 13B's cost shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from soft_jax.reproduce.plan import EXITS, STUDY_RUNS as RUNS, STUDY_TASKS as TASKS
from soft_jax.utils.plot import line_figure
from soft_jax.utils.tables import markdown_table

HEAD_FRACTION = 0.01  # LLaMA-2 13B: 5120 x 32000 head of ~13e9 weights
PROJECTION_K = range(1, 9)
# docs/reproduction.md, equal-weight SoFT at the same budget (the targets are relative to it)
DOC_PAPER = {"loss": {9: 5.148, 12: 4.475, 15: 4.180, 18: 3.941, 21: 3.066, 24: 1.832,
                      27: 1.554, 30: 1.137},
             "acceptance": {9: 0.13, 12: 0.15, 15: 0.16, 18: 0.17, 21: 0.20, 24: 0.37, 27: 0.47},
             "sft_last": 0.868}
TARGET_ACCEPTANCE = {21: 0.35, 24: 0.50, 27: 0.60}
MID_EXITS = range(15, 28, 3)  # the exits held within 5% of equal-weight SoFT


def projected_speedup(a: float, depth: float, head: float = HEAD_FRACTION) -> tuple[float, int]:
    """(best speedup, its K): E[tokens per cycle] / cost per cycle in full-model token reads,
    S(K) = (1 - a^(K+1)) / (1 - a) / (K c_d + c_v), with c_d = (1 - h) depth + h (a draft
    token) and c_v = (1 - h)(1 - depth) + h (one memory-bound verify pass over layers after
    the draft, reusing its KV); `a` the per-token acceptance, `depth` = draft exit / layers."""
    c_d, c_v = (1 - head) * depth + head, (1 - head) * (1 - depth) + head

    def speedup(k: int) -> float:
        tokens = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
        return tokens / (k * c_d + c_v)

    k = max(PROJECTION_K, key=speedup)
    return speedup(k), k


def _loss(res: dict, e: int) -> float | None:
    return res.get("loss", {}).get("per_exit", {}).get(str(e), {}).get("loss")


def _acc(res: dict, e: int) -> float | None:
    return res.get("loss", {}).get("per_exit", {}).get(str(e), {}).get("accuracy")


def _kl(res: dict, e: int) -> float | None:
    analyses = res.get("sortedness", {}).get("analyses", {})
    if not analyses:
        return None
    a = next(iter(analyses.values()))
    return float(np.nanmean(a["kl"][a["exits"].index(e)])) if e in a["exits"] else None


def _accept(res: dict, d: int) -> float | None:
    return res.get("decoding", {}).get("acceptance", {}).get(str(d))


def _baseline(dec: dict) -> str:
    """Full greedy ms/token timed first and last in one decoding run, and their ratio."""
    if "baseline_drift" not in dec:
        return f"{dec['baseline_ms_per_token']:.1f} ms / not timed again"
    return (f"{dec['baseline_ms_per_token']:.1f} / {dec['baseline_ms_per_token_last']:.1f} ms "
            f"({dec['baseline_drift']:.2f}x)")


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _targets(name: str, res: dict, paper: dict) -> list[str]:
    """Each target of the issue for one recipe: met, or missed by how much."""
    out = []
    last = _loss(res, EXITS[-1])
    if last is not None:
        out.append(f"last-layer loss {last:.3f} vs <= 0.90: "
                   + ("met" if last <= 0.90 else f"missed by {last - 0.90:.3f}"))
    worse = [(e, _loss(res, e) / paper[e] - 1) for e in MID_EXITS
             if _loss(res, e) is not None and paper.get(e)]
    if worse:
        e, r = max(worse, key=lambda x: x[1])
        out.append(f"exits 15-27 within 5% of equal-weight SoFT: worst exit {e} at {100 * r:+.1f}%"
                   + (" (met)" if r <= 0.05 else " (missed)"))
    for d, t in TARGET_ACCEPTANCE.items():
        a = _accept(res, d)
        if a is not None:
            out.append(f"acceptance at draft {d} {a:.2f} vs >= {t:.2f}: "
                       + ("met" if a >= t else f"missed by {t - a:.2f}"))
    return [f"- **{name}**: " + "; ".join(out)] if out else []


def round_section(results: dict, title: str, figs: Path, tag: str) -> list[str]:
    """Per-exit table, last layer vs SFT, acceptance, speed and projection of one round."""
    runs = results
    if not runs:
        return [f"## {title}", "", "No stage of this round is done yet.", ""]
    names = list(runs)
    md = [f"## {title}", ""]
    short = title.split(" (")[0]  # figure titles must fit the figure
    rows = [[e] + [f"{_f(_loss(runs[n], e))} / {_f(_acc(runs[n], e))} / {_f(_kl(runs[n], e), 2)}"
                   for n in names] + [f"{DOC_PAPER['loss'][e]:.3f}"] for e in EXITS]
    md += ["Held-out loss / next-token accuracy / KL(p_last || p_exit) per exit ('-': stage "
           "not done); last column: equal-weight SoFT at 30 steps as documented below.", "",
           markdown_table(["exit"] + names + ["documented SoFT loss (30 steps)"], rows, "---:"),
           ""]
    sft_last = _loss(runs.get("sft", {}), EXITS[-1]) or DOC_PAPER["sft_last"]
    md += ["Last layer against SFT (" + f"{sft_last:.3f} nats): " + ", ".join(
        f"{n} {_loss(runs[n], EXITS[-1]) - sft_last:+.3f}" for n in names
        if n != "sft" and _loss(runs[n], EXITS[-1]) is not None) + ".", ""]
    dec = [n for n in names if runs[n].get("decoding")]
    if dec:
        rows = []
        for d in EXITS[:-1]:
            cells = []
            for n in dec:
                row = next(r for r in runs[n]["decoding"]["rows"]
                           if r["mode"] == "speculative" and r["draft_exit"] == d)
                proj, k = projected_speedup(row["acceptance"], d / EXITS[-1])
                cells.append(f"{row['acceptance']:.2f} / {row['speedup']:.2f}x / {proj:.2f}x (K={k})")
            rows.append([d] + cells)
        md += ["Greedy draft acceptance / measured CPU speedup (ms/token ratio against full "
               "greedy, same process) / **projected** LLaMA-2 13B speedup:", "",
               markdown_table(["draft exit"] + dec, rows, "---:"), ""]
        rows = [[r["label"], *[f"{x['ms_per_token']:.1f} ms, {x['speedup']:.2f}x"
                               for x in [next(y for y in runs[n]["decoding"]["rows"]
                                              if y["label"] == r["label"]) for n in dec]]]
                for r in runs[dec[0]]["decoding"]["rows"] if r["mode"] == "dynamic"]
        rows.append(["full greedy, first / last timing", *[
            _baseline(runs[n]["decoding"]) for n in dec]])
        md += ["Dynamic exit: ms/token, speedup against full greedy (same process); the last "
               "row is the baseline timed before and after every other row (a ratio far from "
               "1 means the machine's load changed and the speedups of that run are "
               "unreliable):", "", markdown_table(["setting"] + dec, rows, "---:"), ""]
        line_figure(figs / f"study_acceptance_{tag}.png", EXITS[:-1],
                    {n: [_accept(runs[n], d) for d in EXITS[:-1]] for n in dec},
                    "greedy draft acceptance", f"{short}: draft acceptance", ylim=(0, 1))
        md += [f"![acceptance](figures/study_acceptance_{tag}.png)", ""]
    have = [n for n in names if _loss(runs[n], EXITS[-1]) is not None]
    if have:
        line_figure(figs / f"study_loss_{tag}.png", EXITS,
                    {n: [_loss(runs[n], e) for e in EXITS] for n in have},
                    "held-out loss (nats/token, log scale)", f"{short}: held-out loss",
                    log_y=True)  # SFT's early exits are ~10x the others
        md += [f"![held-out loss](figures/study_loss_{tag}.png)", ""]
    paper = {e: _loss(runs["soft"], e) for e in EXITS} if "soft" in runs and \
        _loss(runs["soft"], 15) is not None else DOC_PAPER["loss"]
    md += ["Targets (against " + ("this run's" if paper is not DOC_PAPER["loss"] else
                                  "the documented") + " equal-weight SoFT):", ""]
    md += [line for n in names if n not in ("sft", "soft")
           for line in _targets(n, runs[n], paper)] or ["- no recipe evaluated yet"]
    return md + [""]


def training_section(run: Path) -> list[str]:
    """Per-exit *training* loss (the step's own batch) at each first-round run's last logged
    step: the only signal of a run whose held-out stages are not done."""
    import json


    last = {}
    for n in RUNS:
        path = run / n / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines:
            last[n] = json.loads(lines[-1])
    if not last:
        return []
    rows = [[e] + [_f(m.get(f"loss/exit_{e}")) for m in last.values()] for e in EXITS]
    return ["## Training loss per exit at the last logged step", "",
            "One training batch (not held out): " + ", ".join(
                f"{n} step {int(m.get('step', 0))}" for n, m in last.items()) + ".", "",
            markdown_table(["exit"] + list(last), rows, "---:"), ""]


def closing_section(first: dict, long: dict) -> list[str]:
    """Each 4x run against its own 30-step run: which gaps close with 4x the training."""
    names = [n for n in long if n != "sft" and _loss(long[n], EXITS[-1]) is not None
             and _loss(first.get(n, {}), EXITS[-1]) is not None]
    if not names:
        return []
    sft_first, sft_long = (_loss(r.get("sft", {}), EXITS[-1]) for r in (first, long))

    def last(res: dict) -> float | None:
        return _loss(res, EXITS[-1])

    def mid(res: dict) -> float | None:
        losses = [_loss(res, e) for e in MID_EXITS]
        return None if None in losses else float(np.mean(losses))

    def pair(n: str, f, digits: int = 3) -> str:
        return f"{_f(f(first[n]), digits)} -> {_f(f(long[n]), digits)}"

    def gap(res: dict, sft_last: float | None) -> float | None:
        return None if sft_last is None else last(res) - sft_last

    rows = [[n, pair(n, last), f"{_f(gap(first[n], sft_first))} -> {_f(gap(long[n], sft_long))}",
             pair(n, mid)] + [pair(n, lambda r, d=d: _accept(r, d), 2) for d in TARGET_ACCEPTANCE]
            for n in names]
    return ["## What 4x the training closes", "",
            "Each run at 30 -> 120 steps: last-layer held-out loss, its gap to SFT at the same "
            "budget, mean held-out loss of exits 15-27, and greedy draft acceptance:", "",
            markdown_table(["run", "last layer", "gap to SFT", "exits 15-27"]
                           + [f"acceptance {d}" for d in TARGET_ACCEPTANCE], rows,
                           "---:"), ""]


def pending(run: Path, results: dict) -> list[str]:
    """The runs / stages not done yet."""

    out = []
    for key, names in (("first", RUNS), ("long", results.get("long_runs", []))):
        for n in names:
            missing = [t for t in ("train",) + TASKS if t not in results[key].get(n, {})]
            if missing:
                out.append(f"{key} round {n}: {', '.join(missing)}")
    if not results.get("long_runs"):
        out.append("the 4x round (not chosen until every first-round run is evaluated)")
    return out


def write_study_report(run: Path, results: dict) -> Path:
    """Write RUN/study_report.md (+ RUN/figures/) from the finished stages; returns its path."""
    run = Path(run)
    figs = run / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    md = ["# Exit-loss recipe study (SmolLM2-135M-Instruct, GSM8K demo split)", "",
          "Projection formula (a **projection**, not a measurement): S = max_K "
          "(1 - a^(K+1)) / (1 - a) / (K c_d + c_v), c_d = (1 - h) n/L + h, c_v = (1 - h)(1 - "
          "n/L) + h, h = 0.01 (LLaMA-2 13B's head share of the weights), a = measured greedy "
          "acceptance at draft exit n of L = 30 (same relative depth on 40 layers), "
          "K = 1..8; decoding is taken as weight-bandwidth bound (cost = weights read).", ""]
    md += round_section(results["first"], "30 steps x 2 x 512 tokens (the reproduction's "
                        "budget), seed 42", figs, "x1")
    md += round_section(results["long"], "4x budget (120 steps)", figs, "x4")
    md += closing_section(results["first"], results["long"])
    md += training_section(run)
    md += ["## Pending", ""] + [f"- {p}" for p in pending(run, results)
                                 or ["nothing: every stage is done"]] + [""]
    path = run / "study_report.md"
    path.write_text("\n".join(md) + "\n")
    return path
