"""The `decoding` eval task: the paper's speed table. Greedy, batch 1, over a task's prompts:

* ``greedy``: plain decoding with the full model (the baseline of every speedup) and with each
  exit's sub-model alone;
* ``speculative``: self-speculative decoding drafting with each draft exit, verified by the
  full model (asserted token-identical to greedy);
* ``dynamic``: instance-aware dynamic exit ("Layer a:L") at the paper's thresholds (mapped by
  relative depth) and at uniform thresholds (`decoding.sweep`).

Every configuration is run once untimed (compiling every shape it meets) and then timed, all
in the same process, so ms/token ratios compare like with like.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from soft_jax.data import formats as data_lib
from soft_jax.eval.prompting import encode_prompt, instruction_items, log, task_rows
from soft_jax.eval.scoring import (extract_gsm8k_answer, rouge_l, triviaqa_exact_match,
                                   triviaqa_prediction)
from soft_jax.io.loading import LoadedModel
from soft_jax.utils.plot import pyplot

METRICS = {"gsm8k": "accuracy", "triviaqa": "exact match"}  # otherwise ROUGE-L (judge-free)


def quality(fmt: str, texts: list[str], rows: list[dict], refs: list[str]) -> dict:
    """The task's quality metric over `texts` (one per row), plus ROUGE-L to the references."""
    out = {"metric": METRICS.get(fmt, "rouge-l"),
           "rouge_l": sum(rouge_l(t, r or "") for t, r in zip(texts, refs)) / len(texts)}
    if fmt == "gsm8k":
        ok = [extract_gsm8k_answer(t) == extract_gsm8k_answer(r["answer"])
              for t, r in zip(texts, rows)]
    elif fmt == "triviaqa":
        ok = [triviaqa_exact_match(triviaqa_prediction(t), data_lib.triviaqa_answer(r, i)[1])
              for i, (t, r) in enumerate(zip(texts, rows))]
    else:
        return {**out, "quality": out["rouge_l"]}
    return {**out, "quality": sum(ok) / len(ok), "correct": int(sum(ok)), "total": len(ok)}


DRIFT_WARN = 0.10  # the baseline timed first and last differing by more: a loaded machine


def timed(config, params, prompts: list[list[int]], n_new: int, warm: bool = True,
          **kw) -> tuple[list, dict]:
    """Tokens per prompt and summed stats of soft_jax.generate, after an untimed pass over
    the same prompts (compiles every shape the timed pass meets, adaptive draft lengths
    included; `warm=False` skips it for a setting already timed)."""
    from soft_jax.infer.generate import generate

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        for p in prompts if warm else ():
            generate(config, params, [p], n_new, **kw)
        outs = [generate(config, params, [p], n_new, **kw) for p in prompts]
    toks = [o.tokens[0] for o in outs]
    n = sum(len(t) for t in toks)
    stats = {"tokens": n, "time_s": sum(o.stats["time_s"] for o in outs)}
    stats["ms_per_token"] = 1000 * stats["time_s"] / max(1, n)
    for key in ("drafted", "accepted"):
        if key in outs[0].stats:
            stats[key] = sum(o.stats[key] for o in outs)
    if "mean_exit_layer" in outs[0].stats:
        taken = [e for o in outs for e in o.stats["exits"]]
        stats["mean_exit_layer"] = sum(taken) / max(1, len(taken))
    return toks, stats


def _settings(c, config, exits) -> list[tuple[str, dict, dict]]:
    """(label, row fields, generate kwargs) of every row, the full-model baseline first."""
    last = config.num_layers
    drafts = [int(d) for d in (c.draft_exits or exits) if int(d) < last]
    out = [(f"greedy {last}", {"mode": "greedy", "exit": last}, {})]
    out += [(f"greedy {e}", {"mode": "greedy", "exit": e}, {"exit_layer": e})
            for e in exits if e < last]
    out += [(f"speculative {d}", {"mode": "speculative", "draft_exit": d}, {"draft_exit": d})
            for d in drafts]
    out += [(f"dynamic {lab}", {"mode": "dynamic", "exit": f"{lo}:{last}", "thresholds": lab},
             {"dynamic": True, "thresholds": thr})
            for lab, thr in [("paper", None)] + [(f"{t:g}", float(t)) for t in c.sweep]
            for lo in [min(exits)]]
    return out


def task_decoding(cfg, model: LoadedModel, exits, out: Path, ctx: dict) -> dict:
    """Rows of ms/token, speedup over full greedy, quality, rejection ratio and mean exit
    layer per decoding mode; writes decoding.png beside the results."""
    c = cfg.decoding
    rows = task_rows(c, "decoding")
    items = instruction_items(rows, c.format, model.tokenizer if model.chat else None)
    prompts = [encode_prompt(model.tokenizer, it["prompt"], cfg.max_prompt_tokens,
                             not model.chat) for it in items]
    refs = [it["reference"] for it in items]
    config = model.config.replace(exits=tuple(e for e in exits if e < model.config.num_layers))
    table, greedy, base = [], None, None
    for label, fields, kw in _settings(c, config, exits):
        toks, st = timed(config, model.params, prompts, c.max_new_tokens, **kw)
        if greedy is None:
            greedy, base = toks, st["ms_per_token"]
        q = quality(c.format, [model.tokenizer.decode(t, skip_special_tokens=True) for t in toks],
                    rows, refs)
        drafted = st.get("drafted")
        row = {**fields, "label": label, "ms_per_token": st["ms_per_token"],
               "speedup": base / st["ms_per_token"], **q,
               "rejection_ratio": 1 - st["accepted"] / max(1, drafted) if drafted else None,
               "acceptance": st["accepted"] / max(1, drafted) if drafted else None,
               "mean_exit_layer": st.get("mean_exit_layer", fields.get("exit")
                                         if fields["mode"] == "greedy" else config.num_layers),
               "identical_to_greedy": toks == greedy, "tokens": st["tokens"]}
        if fields["mode"] == "speculative" and not row["identical_to_greedy"]:
            raise AssertionError(f"self-speculative decoding with draft exit "
                                 f"{fields['draft_exit']} changed the greedy output")
        table.append(row)
        log(f"decoding {label}: {row['ms_per_token']:.1f} ms/token, {row['speedup']:.2f}x, "
            f"{row['metric']} {row['quality']:.3f}"
            + (f", rejection {row['rejection_ratio']:.2f}" if drafted else ""))
    # the baseline again, last: ratios taken across minutes mean little if the load changed
    _, end = timed(config, model.params, prompts, c.max_new_tokens, warm=False)
    drift = end["ms_per_token"] / base
    if abs(drift - 1) > DRIFT_WARN:
        log(f"warning: full greedy took {base:.1f} ms/token first and {end['ms_per_token']:.1f} "
            f"last ({drift:.2f}x): the machine's load changed, so the speedups are unreliable")
    decoding_figure(out / "decoding.png", table, model.name)
    return {"source": c.source, "format": c.format, "prompts": len(prompts),
            "max_new_tokens": c.max_new_tokens, "baseline_ms_per_token": base,
            "baseline_ms_per_token_last": end["ms_per_token"], "baseline_drift": drift,
            "rows": table,
            "acceptance": {str(r["draft_exit"]): r["acceptance"] for r in table
                           if r["mode"] == "speculative"}}


def decoding_figure(path: Path, table: list[dict], name: str) -> Path:
    """Speedup over full-model greedy per row (bars), the baseline at 1."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(table)), 4))
    colors = {"greedy": "tab:gray", "speculative": "tab:blue", "dynamic": "tab:orange"}
    ax.bar(range(len(table)), [r["speedup"] for r in table],
           color=[colors[r["mode"]] for r in table])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(table)), [r["label"] for r in table], rotation=60, ha="right",
                  fontsize=8)
    ax.set_ylabel("speedup over full-model greedy (ms/token ratio)")
    ax.set_title(f"{name}: batch-1 decoding")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
