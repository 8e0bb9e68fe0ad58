"""Run the eval tasks of an eval config over one model (and optionally a second one) and write
results.json, report.md, PNG figures and the per-example JSONL files into config.out_dir."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path

import numpy as np

from soft_jax import data as data_lib
from soft_jax.config import LlamaConfig
from soft_jax.eval import pairwise as pw
from soft_jax.eval import sortedness as srt
from soft_jax.eval.config import validate
from soft_jax.eval.scoring import (LM_EVAL_GSM8K_FILTERS, cut_at_next_question,
                                   extract_gsm8k_answer, lm_eval_gsm8k, triviaqa_exact_match,
                                   triviaqa_prediction)
from soft_jax.exits import check_heads, layer_count


def log(msg: str) -> None:
    print(f"[eval] {msg}", flush=True)


# ------------------------------------------------------------------------------ models
@dataclasses.dataclass
class Model:
    """A loaded model: its name, config, params, tokenizer and where it came from."""

    name: str
    config: LlamaConfig
    params: dict
    tokenizer: object
    source: str
    chat: bool = False  # prompts use the tokenizer's chat template (config.template)


def load_model(ckpt: str = "", hf: str = "", tokenizer: str = "", dtype: str = "float32",
               name: str = "model", field: str = "config",
               ckpt_dtype: str | None = None) -> Model:
    """A soft_jax checkpoint / work dir (`ckpt`, cast to `ckpt_dtype` if given) or HF folder
    (`hf`, loaded in `dtype`) with its tokenizer. Errors name the config field (`field`.ckpt,
    `field`.hf, `field`.tokenizer).
    """
    from soft_jax.checkpoint import CheckpointError
    from soft_jax.loading import TokenizerError, load_model as load

    if bool(ckpt) == bool(hf):
        raise ValueError(f"{field}.ckpt / {field}.hf: set exactly one")
    if tokenizer.startswith("bpe:"):
        raise ValueError(f"{field}.tokenizer={tokenizer!r}: eval needs the tokenizer the model "
                         "was trained with (a folder), not a new BPE")
    key, path = ("ckpt", ckpt) if ckpt else ("hf", hf)
    try:
        config, params, tok, source = load(path, dtype if hf else ckpt_dtype,
                                           tokenizer=tokenizer or True)
    except TokenizerError as e:
        raise ValueError(f"{field}.tokenizer: {e}") from None
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise type(e)(f"{field}.{key}={path!r}: {e}") from None
    if tok is None:
        raise ValueError(f"{field}.tokenizer: no tokenizer is saved with {path!r}; set "
                         f"{field}.tokenizer to a tokenizer folder")
    return Model(name, config, params, tok, source)


def resolve_exits(config: LlamaConfig, exits, field: str = "config.exits") -> tuple[int, ...]:
    """The chosen exits, sorted (empty = the config's exits incl. the last layer)."""
    if isinstance(exits, (int, str)) and not isinstance(exits, bool):
        exits = [exits]
    exits = list(exits or ())
    if not exits:
        return config.resolved_exits

    def count(e):
        if isinstance(e, str) and e.strip().lstrip("-").isdigit():
            e = int(e)
        return layer_count(e, config.num_layers, f"{field}:")

    return tuple(sorted({count(e) for e in exits}))


# ------------------------------------------------------------------------------ generation
def encode_prompt(tokenizer, text: str, max_tokens: int, bos: bool = True) -> list[int]:
    """BOS + the prompt's tokens; prompts longer than max_tokens keep BOS and their end.
    `bos=False` for chat-template text, which carries its own special tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and bos else []
    keep = max_tokens - len(bos)
    return bos + ids[-keep:] if len(ids) > keep else bos + ids


def generate_ids(model: Model, prompts: list[list[int]], exit_layer: int, max_new_tokens: int,
                 batch_size: int, **generate_kw) -> list[list[int]]:
    """Continuations (prompt excluded) of token-id prompts with sub-model `exit_layer`;
    prompts are batched by length (left-padded by soft_jax.generate). Greedy unless
    `generate_kw` (soft_jax.generate's keywords: temperature, stop_tokens, ...) say else."""
    from soft_jax.generation import generate

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = [prompts[i] for i in idx]
        with warnings.catch_warnings():  # cache donation is a no-op on CPU
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            toks = generate(model.config, model.params, batch, max_new_tokens,
                            exit_layer=exit_layer, **generate_kw).tokens
        for i, t in zip(idx, toks):
            out[i] = list(t)
    return out


def generate_texts(model: Model, prompts: list[str], exit_layer: int, max_new_tokens: int,
                   batch_size: int, max_prompt_tokens: int) -> list[str]:
    """Greedy continuations of text prompts (special tokens dropped)."""
    ids = [encode_prompt(model.tokenizer, p, max_prompt_tokens, not model.chat) for p in prompts]
    gen = generate_ids(model, ids, exit_layer, max_new_tokens, batch_size)
    return [model.tokenizer.decode(g, skip_special_tokens=True) for g in gen]


# ------------------------------------------------------------------------------ data
def _rows(section, what: str) -> list[dict]:
    if not section.source:
        raise ValueError(f"config.{what}.source is empty")
    try:
        rows = data_lib.load_rows(section.source, section.get("split", "train"),
                                  section.get("subset") or None)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.{what}.source: {e}") from None
    if section.get("max_examples"):
        rows = rows[:section.max_examples]
    if not rows:
        raise ValueError(f"config.{what}.source={section.source!r} has no rows")
    return rows


def instruction_items(rows: list[dict], fmt: str, chat_tokenizer=None) -> list[dict]:
    """Per row: prompt (the formatted model input: the chat template of `chat_tokenizer` when
    given), instruction / input (what a judge reads) and reference (the first target text)."""
    if fmt not in data_lib.FORMATS:
        raise ValueError(f"format {fmt!r}; expected one of {sorted(data_lib.FORMATS)}")
    items = []
    for i, row in enumerate(rows):
        segs = data_lib.FORMATS[fmt](row, i)
        prompt, reference = "", None
        for text, is_target in segs:
            if is_target:
                reference = text.strip()
                break
            prompt += text
        if not prompt:
            raise ValueError(f"format {fmt!r} has no prompt to generate from (row {i}); use an "
                             "instruction format (alpaca, gsm8k, triviaqa, chat)")
        if fmt == "alpaca":
            instruction, inp = row["instruction"], row.get("input") or ""
        elif "question" in row:
            instruction, inp = row["question"], ""
        elif fmt in ("chat", "sharegpt"):
            instruction, inp = segs[1][0].strip(), ""
        else:
            instruction, inp = prompt, ""
        if chat_tokenizer is not None:
            msgs = data_lib.chat_messages(fmt, row, i)
            first = next(k for k, m in enumerate(msgs) if m["role"] == "assistant")
            prompt = data_lib.chat_prompt(chat_tokenizer, msgs[:first])
        items.append({"id": i, "prompt": prompt, "instruction": instruction, "input": inp,
                      "reference": reference})
    return items


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path, field: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r} does not exist")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ tasks
def task_loss(cfg, model: Model, exits, out: Path, ctx: dict) -> dict:
    from soft_jax.metrics import per_exit_metrics

    c = cfg.loss
    rows = _rows(c, "loss")
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


def gsm8k_prompt(question: str, shots: list[dict], chat_tokenizer=None) -> str:
    """Zero-shot: the training prompt; k-shot: k worked examples (question + full solution
    ending in '#### N') separated by blank lines, then the question. With `chat_tokenizer`:
    its chat template, each worked example a user / assistant exchange."""
    if chat_tokenizer is not None:
        msgs = [m for s in shots for m in data_lib.chat_messages("gsm8k", s, 0)]
        return data_lib.chat_prompt(chat_tokenizer, msgs + [{"role": "user", "content": question}])
    prefix = "".join(data_lib.GSM8K_PROMPT.format(question=s["question"]) + s["answer"].strip()
                     + "\n\n" for s in shots)
    return prefix + data_lib.GSM8K_PROMPT.format(question=question)


def task_gsm8k(cfg, model: Model, exits, out: Path, ctx: dict) -> dict:
    c = cfg.gsm8k
    rows = _rows(c, "gsm8k")
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


def task_triviaqa(cfg, model: Model, exits, out: Path, ctx: dict) -> dict:
    c = cfg.triviaqa
    rows = _rows(c, "triviaqa")
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


def _generations(cfg, model: Model, exits, items, out: Path, filename: str) -> dict:
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
        ctx["items"] = instruction_items(_rows(cfg.generate, "generate"), cfg.generate.format,
                                         ctx.get("chat_tokenizer"))
    return ctx["items"]


def task_generate(cfg, model: Model, exits, out: Path, ctx: dict) -> dict:
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


def task_pairwise(cfg, model: Model, exits, out: Path, ctx: dict) -> dict:
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
    table = pw.markdown_table(matrix, name_a, name_b)
    result = {"judge": judge.name, "a": name_a, "b": name_b, "examples": len(items),
              "matrix": pw.matrix_to_json(matrix), "table_markdown": table}
    (out / "pairwise.json").write_text(json.dumps(result, indent=2))
    return result


def _sortedness_seqs(cfg, model: Model) -> list[tuple[list[int], int]]:
    c = cfg.sortedness
    items = instruction_items(_rows(c, "sortedness"), c.format,
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


def task_sortedness(cfg, model: Model, exits, out: Path, ctx: dict) -> dict:
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
    (out / "sortedness.json").write_text(json.dumps(_jsonable(result), indent=2))
    return result


TASK_FNS = {"loss": task_loss, "gsm8k": task_gsm8k, "triviaqa": task_triviaqa,
            "generate": task_generate, "pairwise": task_pairwise,
            "sortedness": task_sortedness}


# ------------------------------------------------------------------------------ driver
def run_eval(cfg) -> dict:
    """Run every task of `cfg` (see soft_jax/eval/config.py); returns the results dict that
    is also written to out_dir/results.json, with report.md and PNG figures beside it."""
    from soft_jax.eval.report import write_report

    validate(cfg)
    tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    t0 = time.perf_counter()
    model = load_model(cfg.ckpt, cfg.hf, cfg.tokenizer, cfg.dtype, cfg.name, "config")
    model.chat = data_lib.resolve_template(cfg.template, model.tokenizer, "gsm8k") == "chat"
    exits = resolve_exits(model.config, cfg.exits, "config.exits")
    check_heads(model.config, model.params, exits, "config.exits")
    ctx: dict = {"chat_tokenizer": model.tokenizer if model.chat else None}
    if (cfg.second.ckpt or cfg.second.hf) and {"pairwise", "sortedness"} & set(tasks):
        second = load_model(cfg.second.ckpt, cfg.second.hf, cfg.second.tokenizer, cfg.dtype,
                            cfg.second.name, "config.second")
        second.chat = model.chat
        ctx["second"] = second
        if cfg.second.exits:
            ctx["second_exits"] = resolve_exits(second.config, cfg.second.exits,
                                                "config.second.exits")
        else:
            ctx["second_exits"] = tuple(e for e in exits if e <= second.config.num_layers) \
                or second.config.resolved_exits
        check_heads(second.config, second.params, ctx["second_exits"],
                    "config.second.exits")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{model.name}: {model.source} ({model.config.num_layers} layers), exits {exits}, "
        f"tasks {tasks} -> {out}")
    results = {
        "model": {"name": model.name, "source": model.source,
                  "num_layers": model.config.num_layers, "hidden_size": model.config.hidden_size,
                  "vocab_size": model.config.vocab_size},
        "exits": list(exits), "tasks": tasks, "config": cfg.to_dict(),
    }
    if "second" in ctx:
        s = ctx["second"]
        results["second_model"] = {"name": s.name, "source": s.source,
                                   "num_layers": s.config.num_layers,
                                   "exits": list(ctx["second_exits"])}
    for task in tasks:
        t = time.perf_counter()
        results[task] = TASK_FNS[task](cfg, model, exits, out, ctx)
        results[task]["seconds"] = round(time.perf_counter() - t, 2)
    results["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    write_report(results, out)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return results


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x
