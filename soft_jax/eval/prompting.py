"""What every eval task builds on: its data rows, prompts (plain or chat-template), batched
generation from one exit, and the JSONL files of per-example outputs."""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np

from soft_jax.data import formats as data_lib
from soft_jax.io.loading import LoadedModel
from soft_jax.utils.log import log as log_line

log = partial(log_line, tag="eval")  # eval's progress lines carry an [eval] tag


def encode_prompt(tokenizer, text: str, max_tokens: int, bos: bool = True) -> list[int]:
    """BOS + the prompt's tokens; prompts longer than max_tokens keep BOS and their end.
    `bos=False` for chat-template text, which carries its own special tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and bos else []
    keep = max_tokens - len(bos)
    return bos + ids[-keep:] if len(ids) > keep else bos + ids


def generate_ids(model: LoadedModel, prompts: list[list[int]], exit_layer: int, max_new_tokens: int,
                 batch_size: int, **generate_kw) -> list[list[int]]:
    """Continuations (prompt excluded) of token-id prompts with sub-model `exit_layer`;
    prompts are batched by length (left-padded by soft_jax.generate). Greedy unless
    `generate_kw` (soft_jax.generate's keywords: temperature, stop_tokens, ...) say else."""
    from soft_jax.infer.generate import generate

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


def generate_texts(model: LoadedModel, prompts: list[str], exit_layer: int, max_new_tokens: int,
                   batch_size: int, max_prompt_tokens: int) -> list[str]:
    """Greedy continuations of text prompts (special tokens dropped)."""
    ids = [encode_prompt(model.tokenizer, p, max_prompt_tokens, not model.chat) for p in prompts]
    gen = generate_ids(model, ids, exit_layer, max_new_tokens, batch_size)
    return [model.tokenizer.decode(g, skip_special_tokens=True) for g in gen]


def task_rows(section, what: str) -> list[dict]:
    """The rows of a task's data section (config.WHAT.source, split, subset, max_examples)."""
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
    """One JSON line per row."""
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path, field: str) -> list[dict]:
    """The rows of a JSONL file; a missing file names `field`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r} does not exist")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


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


def jsonable(x):
    """`x` with str keys, lists for tuples, None for NaN / inf and numpy scalars as Python."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return jsonable(x.item())
    return x
