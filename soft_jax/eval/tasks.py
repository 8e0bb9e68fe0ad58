"""The eval tasks, one function each (cfg, model, exits, out, ctx) -> results: held-out loss,
GSM8K, TriviaQA, generations, pairwise judging and the sorted-ness analysis."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from soft_jax.data import formats as data_lib
from soft_jax.eval import pairwise as pw
from soft_jax.eval import sortedness as srt
from soft_jax.eval.decoding import task_decoding
from soft_jax.eval.prompting import (encode_prompt, generate_ids, generate_texts, gsm8k_prompt,
                                     instruction_items, jsonable, log, read_jsonl, task_rows, write_jsonl)
from soft_jax.eval.scoring import (LM_EVAL_GSM8K_FILTERS, cut_at_next_question,
                                   extract_gsm8k_answer, lm_eval_gsm8k, triviaqa_exact_match,
                                   triviaqa_prediction)
from soft_jax.io.loading import LoadedModel


def task_loss(cfg, model: LoadedModel, exits, out: Path, ctx: dict) -> dict:
    from soft_jax.train.heldout import per_exit_metrics

    c = cfg.loss
    rows = task_rows(c, "loss")
    stats = data_lib.DataStats()
    template = "chat" if model.chat and c.format != "text" else "plain"
    examples = data_lib.tokenize_rows(rows, c.format, model.tokenizer, c.seq_len, "skip", stats,
                                      template)
    if not examples:
        raise ValueError(f"config.loss: no usable rows in {c.source!r} for format {c.format!r} "
                         f"({stats.skipped_reasons[:1]})")
    seq_len = min(c.seq_len, max(len(ids) for ids, _ in examples) - 1)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    bs = cfg.batch_size

    def batches():
        for s in range(0, len(examples), bs):
            b = data_lib.pack_examples(examples[s:s + bs], seq_len, pack=False, pad_id=pad)
            n = len(b["input_ids"])
            if n < bs:  # pad with empty rows (no loss) so every batch has one shape
                b = {k: np.concatenate([v, np.zeros((bs - n,) + v.shape[1:], v.dtype)])
                     for k, v in b.items()}
            yield b

    if not stats.target_tokens:
        raise ValueError(f"config.loss: no target tokens left in {c.source!r} (every target "
                         f"was cut off at config.loss.seq_len={c.seq_len})")
    metrics = per_exit_metrics(model.config, model.params, batches(), exits)
    per_exit = {str(e): metrics[e] for e in exits}
    for e in exits:
        m = metrics[e]
        log(f"loss  exit {e:>3}: loss {m['loss']:.4f}  ppl {m['ppl']:.2f}  acc {m['accuracy']:.3f}")
    return {"source": c.source, "format": c.format, "examples": len(examples),
            "skipped": stats.skipped, "truncated": stats.truncated,
            "tokens": int(metrics[exits[-1]]["tokens"]), "seq_len": c.seq_len,
            "per_exit": per_exit}


def task_gsm8k(cfg, model: LoadedModel, exits, out: Path, ctx: dict) -> dict:
    c = cfg.gsm8k
    rows = task_rows(c, "gsm8k")
    for i, r in enumerate(rows):
        if "question" not in r or "answer" not in r:
            raise ValueError(f"config.gsm8k.source row {i}: needs 'question' and 'answer'")
    golds = [extract_gsm8k_answer(r["answer"]) for r in rows]
    shots_list = [c.shots] if isinstance(c.shots, int) else list(c.shots)
    results, preds_out = {}, []
    for k in shots_list:
        shots = []
        if k:
            shots = data_lib.load_rows(c.few_shot_source)[:k] if c.few_shot_source else []
            if len(shots) < k:
                raise ValueError(f"config.gsm8k.few_shot_source={c.few_shot_source!r} has "
                                 f"{len(shots)} rows; {k}-shot needs {k}")
        chat_tok = model.tokenizer if model.chat else None
        prompts = [gsm8k_prompt(r["question"], shots, chat_tok) for r in rows]
        per_exit = {}
        for e in exits:
            t0 = time.perf_counter()
            outs = generate_texts(model, prompts, e, c.max_new_tokens, cfg.batch_size,
                                  cfg.max_prompt_tokens)
            correct = no_answer = 0
            lm = dict.fromkeys(LM_EVAL_GSM8K_FILTERS, 0)
            for i, o in enumerate(outs):
                cut = cut_at_next_question(o)
                pred = extract_gsm8k_answer(cut)
                ok = golds[i] is not None and pred == golds[i]
                theirs = lm_eval_gsm8k(cut, rows[i]["answer"])
                correct += ok
                no_answer += pred is None
                for name, hit in theirs.items():
                    lm[name] += hit
                preds_out.append({"shots": k, "exit": e, "id": i, "question": rows[i]["question"],
                                  "output": o, "prediction": pred, "gold": golds[i],
                                  "correct": bool(ok), "lm_eval": theirs})
            per_exit[str(e)] = {"accuracy": correct / len(rows), "correct": correct,
                                "total": len(rows), "no_answer": no_answer,
                                **{f"lm_eval_{n.replace('-', '_')}": c / len(rows)
                                   for n, c in lm.items()}}
            log(f"gsm8k {k}-shot exit {e:>3}: accuracy {correct}/{len(rows)} = "
                f"{correct / len(rows):.3f} (lm-eval strict-match "
                f"{lm['strict-match'] / len(rows):.3f}, flexible-extract "
                f"{lm['flexible-extract'] / len(rows):.3f}) ({time.perf_counter() - t0:.1f}s)")
        results[f"{k}-shot"] = per_exit
    write_jsonl(out / "gsm8k_predictions.jsonl", preds_out)
    return {"source": c.source, "examples": len(rows), "max_new_tokens": c.max_new_tokens,
            "shots": shots_list, "few_shot_source": c.few_shot_source, "per_setting": results,
            "predictions": "gsm8k_predictions.jsonl"}


def task_triviaqa(cfg, model: LoadedModel, exits, out: Path, ctx: dict) -> dict:
    c = cfg.triviaqa
    rows = task_rows(c, "triviaqa")
    aliases = [data_lib.triviaqa_answer(r, i)[1] for i, r in enumerate(rows)]
    prefix, shot_rows = "", []
    if c.shots:
        shot_rows = data_lib.load_rows(c.few_shot_source)[:c.shots]
        prefix = "".join(data_lib.TRIVIAQA_PROMPT.format(question=r["question"]) + " "
                         + data_lib.triviaqa_answer(r, i)[0] + "\n\n"
                         for i, r in enumerate(shot_rows))
    prompts = [prefix + data_lib.TRIVIAQA_PROMPT.format(question=r["question"]) for r in rows]
    if model.chat:
        shot_msgs = [m for i, r in enumerate(shot_rows)
                     for m in data_lib.chat_messages("triviaqa", r, i)]
        prompts = [data_lib.chat_prompt(model.tokenizer, shot_msgs + [
            {"role": "user", "content": r["question"]}]) for r in rows]
    per_exit, preds_out = {}, []
    for e in exits:
        outs = generate_texts(model, prompts, e, c.max_new_tokens, cfg.batch_size,
                              cfg.max_prompt_tokens)
        cs = norm = 0
        for i, o in enumerate(outs):
            pred = triviaqa_prediction(o)
            a, b = triviaqa_exact_match(pred, aliases[i], False), triviaqa_exact_match(
                pred, aliases[i], True)
            cs, norm = cs + a, norm + b
            preds_out.append({"exit": e, "id": i, "question": rows[i]["question"], "output": o,
                              "prediction": pred, "aliases": aliases[i], "em_case_sensitive": a,
                              "em_normalized": b})
        per_exit[str(e)] = {"em_case_sensitive": cs / len(rows), "em_normalized": norm / len(rows),
                            "total": len(rows)}
        log(f"triviaqa exit {e:>3}: EM (case-sensitive) {cs / len(rows):.3f}  "
            f"EM (normalised) {norm / len(rows):.3f}")
    write_jsonl(out / "triviaqa_predictions.jsonl", preds_out)
    return {"source": c.source, "examples": len(rows), "shots": c.shots,
            "max_new_tokens": c.max_new_tokens, "per_exit": per_exit,
            "predictions": "triviaqa_predictions.jsonl"}


def _generations(cfg, model: LoadedModel, exits, items, out: Path, filename: str) -> dict:
    """{exit: [output per item]} for `model`, also written as JSONL."""
    gens, rows = {}, []
    prompts = [it["prompt"] for it in items]
    for e in exits:
        t0 = time.perf_counter()
        gens[e] = generate_texts(model, prompts, e, cfg.generate.max_new_tokens, cfg.batch_size,
                                 cfg.max_prompt_tokens)
        log(f"generate {model.name} exit {e:>3}: {len(items)} outputs "
            f"({time.perf_counter() - t0:.1f}s)")
        rows += [{"model": model.name, "exit": e, "id": it["id"], "prompt": it["prompt"],
                  "instruction": it["instruction"], "input": it["input"],
                  "reference": it["reference"], "output": o} for it, o in zip(items, gens[e])]
    write_jsonl(out / filename, rows)
    return gens


def _items(cfg, ctx) -> list[dict]:
    if "items" not in ctx:
        ctx["items"] = instruction_items(task_rows(cfg.generate, "generate"), cfg.generate.format,
                                         ctx.get("chat_tokenizer"))
    return ctx["items"]


def task_generate(cfg, model: LoadedModel, exits, out: Path, ctx: dict) -> dict:
    items = _items(cfg, ctx)
    ctx["gens_a"] = _generations(cfg, model, exits, items, out, "generations.jsonl")
    samples = {str(e): ctx["gens_a"][e][0] for e in exits}
    return {"source": cfg.generate.source, "format": cfg.generate.format,
            "examples": len(items), "max_new_tokens": cfg.generate.max_new_tokens,
            "file": "generations.jsonl", "first_output_per_exit": samples}


def _from_file(path, field: str):
    rows = read_jsonl(path, field)
    items, gens = {}, {}
    for r in rows:
        for key in ("id", "exit", "output", "instruction"):
            if key not in r:
                raise ValueError(f"{field}={path!r}: rows need 'id', 'exit', 'instruction' and "
                                 f"'output' (missing {key!r})")
        items.setdefault(r["id"], {"id": r["id"], "instruction": r["instruction"],
                                   "input": r.get("input") or "", "reference": r.get("reference")})
        gens.setdefault(int(r["exit"]), {})[r["id"]] = r["output"]
    ids = sorted(items)
    for e, g in gens.items():
        if set(g) != set(ids):
            raise ValueError(f"{field}={path!r}: exit {e} lacks outputs for some instructions")
    return [items[i] for i in ids], {e: [g[i] for i in ids] for e, g in sorted(gens.items())}


def task_pairwise(cfg, model: LoadedModel, exits, out: Path, ctx: dict) -> dict:
    c = cfg.pairwise
    second = ctx.get("second")
    if c.a_generations:
        items, gens_a = _from_file(c.a_generations, "config.pairwise.a_generations")
        name_a = model.name
    else:
        items = _items(cfg, ctx)
        if "gens_a" not in ctx:
            ctx["gens_a"] = _generations(cfg, model, exits, items, out, "generations.jsonl")
        gens_a, name_a = ctx["gens_a"], model.name
    if c.b_generations:
        items_b, gens_b = _from_file(c.b_generations, "config.pairwise.b_generations")
        if [it["instruction"] for it in items_b] != [it["instruction"] for it in items]:
            raise ValueError("config.pairwise.b_generations: its instructions differ from model "
                             "A's (same ids and instructions needed)")
        name_b = cfg.second.name
    elif second is not None:
        gens_b = _generations(cfg, second, ctx["second_exits"], items, out,
                              "generations_second.jsonl")
        name_b = second.name
    else:
        gens_b, name_b = gens_a, model.name
    if name_a == name_b:
        name_b = f"{name_b} (same model)" if gens_b is gens_a else f"{name_b} (B)"
    judge = pw.make_judge(c.judge, c.judge_tokenizer, c.judge_max_new_tokens,
                          c.judge_batch_size, c.judge_decoding)
    t0 = time.perf_counter()
    matrix = pw.pairwise_matrix(judge, items, gens_a, gens_b)
    log(f"pairwise: {len(gens_a)} x {len(gens_b)} pairs x {len(items)} instructions x 2 orders "
        f"judged by {judge.name} ({time.perf_counter() - t0:.1f}s)")
    table = pw.matrix_table(matrix, name_a, name_b)
    result = {"judge": judge.name, "a": name_a, "b": name_b, "examples": len(items),
              "matrix": pw.matrix_to_json(matrix), "table_markdown": table}
    (out / "pairwise.json").write_text(json.dumps(result, indent=2))
    return result


def _sortedness_seqs(cfg, model: LoadedModel) -> list[tuple[list[int], int]]:
    c = cfg.sortedness
    items = instruction_items(task_rows(c, "sortedness"), c.format,
                              model.tokenizer if model.chat else None)
    prompts = [encode_prompt(model.tokenizer, it["prompt"], cfg.max_prompt_tokens, not model.chat)
               for it in items]
    if c.response == "generated":
        responses = generate_ids(model, prompts, model.config.num_layers, c.positions,
                                 cfg.batch_size)
    else:
        responses = [model.tokenizer.encode(" " + it["reference"] if c.format == "triviaqa"
                                            and not model.chat
                                            else it["reference"] or "",
                                            add_special_tokens=False)[:c.positions]
                     for it in items]
    seqs = [(p + r, len(p)) for p, r in zip(prompts, responses) if r]
    if not seqs:
        raise ValueError("config.sortedness: no example has a non-empty response")
    return seqs


def task_sortedness(cfg, model: LoadedModel, exits, out: Path, ctx: dict) -> dict:
    c = cfg.sortedness
    seqs = _sortedness_seqs(cfg, model)
    pad = model.tokenizer.pad_token_id or 0
    kw = dict(positions=c.positions, batch_size=cfg.batch_size, pad_id=pad)
    analyses = {}
    t0 = time.perf_counter()
    analyses[f"{model.name} exits vs {model.name} last layer"] = srt.compare_exits(
        model.config, model.params, seqs, exits, **kw)
    second = ctx.get("second")
    notes = []
    if second is not None:
        ex_b = ctx["second_exits"]
        analyses[f"{second.name} exits vs {second.name} last layer"] = srt.compare_exits(
            second.config, second.params, seqs, ex_b, **kw)
        if second.tokenizer.get_vocab() != model.tokenizer.get_vocab() or \
                second.config.vocab_size != model.config.vocab_size:
            notes.append("cross-model comparison skipped: the two models' tokenizers differ")
        else:
            analyses[f"{model.name} exits vs {second.name} last layer"] = srt.compare_exits(
                model.config, model.params, seqs, exits,
                ref=(second.config, second.params, second.config.num_layers), **kw)
            analyses[f"{second.name} exits vs {model.name} last layer"] = srt.compare_exits(
                second.config, second.params, seqs, ex_b,
                ref=(model.config, model.params, model.config.num_layers), **kw)
    for name, a in analyses.items():
        kl = np.asarray(a["kl"])
        log(f"sortedness {name}: mean KL per exit " + ", ".join(
            f"{e}: {np.nanmean(kl[i]):.3f}" for i, e in enumerate(a["exits"])))
    log(f"sortedness: {len(seqs)} sequences ({time.perf_counter() - t0:.1f}s)")
    response = ("the data set's reference answer" if c.response == "reference" else
                f"{model.name}'s greedy last-layer output")
    result = {"source": c.source, "format": c.format, "sequences": len(seqs),
              "positions": c.positions, "response": c.response,
              "response_description": f"teacher-forced on one shared response per prompt: "
                                      f"{response} (first {c.positions} tokens)",
              "kl_definition": "KL(p_ref || p_exit) in nats, ref = the reference last layer",
              "cos_definition": "cosine of the final-RMSNorm-ed hidden states (the LM head input)",
              "analyses": analyses, "notes": notes}
    (out / "sortedness.json").write_text(json.dumps(jsonable(result), indent=2))
    return result


TASK_FNS = {"loss": task_loss, "gsm8k": task_gsm8k, "triviaqa": task_triviaqa,
            "generate": task_generate, "pairwise": task_pairwise,
            "sortedness": task_sortedness, "decoding": task_decoding}
