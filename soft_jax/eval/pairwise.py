"""Pairwise comparison of two sets of generations, PandaLM protocol.

Every (instruction, response A, response B) is judged twice, A shown first and B shown
first; each order counts half. Wins / losses / ties are from A's side, and
score = (wins - losses) / total, total = number of instructions.

Judges are pluggable: anything with a `name` and `judge_many(requests) -> [raw text]`.
  * `HFJudge(folder)`: any Hugging Face causal-LM folder (PandaLM-7B in the paper) prompted
    with PandaLM's format and decoded as PandaLM's inference script does by default
    (`decoding="beam"`: 4 beams, early stopping, repetition penalty 1.2, up to 512 new
    tokens); `decoding="greedy"` is plain greedy decoding. When a prompt is too long, the
    two responses are shortened (from their ends, sharing the room), never the instruction.
  * `RougeLJudge()`: an offline, reference-based stand-in (the response with the higher
    ROUGE-L F1 against the gold answer wins). Its name says so in every output.
Unparsable verdicts count as ties (and are counted separately).

Remaining differences from PandaLM's own pipeline (WeOpenML/PandaLM,
pandalm/utils/pandalm_inference.py): it judges one order (response 1 = the first candidate)
where we judge both and average; it runs one prompt at a time without padding where we batch
with left padding; it never truncates (we shorten responses to fit the judge's context);
its parser takes the first output line exactly "1" / "2" (anything else, "Tie" included,
is a tie) while ours also accepts "1." and "Response 2" and counts unparsable outputs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Protocol, Sequence

from soft_jax.eval.scoring import rouge_l
from soft_jax.utils.tables import markdown_table

PANDALM_PROMPT = (
    "Below are two responses for a given task. The task is defined by the Instruction. "
    "Evaluate the responses and generate a reference answer for the task.\n\n"
    "### Instruction:\n{instruction}\n\n### Response 1:\n{resp1}\n\n### Response 2:\n{resp2}"
    "\n\n### Evaluation:\n")
PANDALM_PROMPT_INPUT = (
    "Below are two responses for a given task. The task is defined by the Instruction with an "
    "Input that provides further context. Evaluate the responses and generate a reference "
    "answer for the task.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response 1:\n{resp1}\n\n### Response 2:\n{resp2}\n\n### Evaluation:\n")
_SPECIAL = re.compile(r"<unk>|<pad>|<s>|</s>|\[PAD\]|<\|endoftext\|>|\[UNK\]|\[CLS\]|\[MASK\]")
VERDICTS = ("1", "2", "Tie")


@dataclasses.dataclass(frozen=True)
class Request:
    """One judgement: which of response1 / response2 better follows the instruction."""

    instruction: str
    input: str
    response1: str
    response2: str
    reference: str | None = None


class Judge(Protocol):
    name: str

    def judge_many(self, requests: Sequence[Request]) -> list[str]:
        """Raw judge output per request (parsed with `parse_verdict`)."""


def pandalm_prompt(instruction: str, input: str, resp1: str, resp2: str) -> str:
    """PandaLM's evaluation prompt (special tokens stripped from the responses, as PandaLM
    does)."""
    r1 = _SPECIAL.sub("", resp1.strip()).strip()
    r2 = _SPECIAL.sub("", resp2.strip()).strip()
    if input and input.strip():
        return PANDALM_PROMPT_INPUT.format(instruction=instruction, input=input, resp1=r1,
                                           resp2=r2)
    return PANDALM_PROMPT.format(instruction=instruction, resp1=r1, resp2=r2)


def parse_verdict(text: str | None) -> str | None:
    """"1", "2" or "Tie" from the first non-empty line of a judge's output; None if unparsable.

    Accepts surrounding whitespace, a trailing '.', any case, and "Response 1" / "Response 2".
    """
    if not text:
        return None
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.rstrip(".").strip().lower()
    if line in ("1", "response 1"):
        return "1"
    if line in ("2", "response 2"):
        return "2"
    if line == "tie":
        return "Tie"
    return None


@dataclasses.dataclass
class PairCounts:
    """A's wins / losses / ties against B, both orders averaged (halves possible)."""

    wins: float = 0.0
    losses: float = 0.0
    ties: float = 0.0
    total: int = 0
    unparsable: int = 0  # judge outputs (of 2 * total) that were read as ties
    order_disagreements: int = 0  # instructions whose two orders gave different winners

    @property
    def score(self) -> float:
        return (self.wins - self.losses) / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "score": self.score}


def _outcome(raw: str, a_first: bool) -> tuple[str, bool]:
    """('win' | 'loss' | 'tie' from A's side, unparsable?)."""
    v = parse_verdict(raw)
    if v is None or v == "Tie":
        return "tie", v is None
    a_won = (v == "1") == a_first
    return ("win" if a_won else "loss"), False


def count_pairwise(judge: Judge, examples: Sequence[dict], outputs_a: Sequence[str],
                   outputs_b: Sequence[str], cache: dict | None = None) -> PairCounts:
    """Judge A vs B on every example in both orders; `examples` have `instruction`, optional
    `input` and `reference`. `cache` (Request -> raw) is shared across calls if given."""
    return pairwise_matrix(judge, examples, {"a": outputs_a}, {"b": outputs_b},
                           cache)["cells"]["a"]["b"]


def pairwise_matrix(judge: Judge, examples: Sequence[dict], gens_a: dict, gens_b: dict,
                    cache: dict | None = None) -> dict:
    """Counts for every (row key of gens_a, column key of gens_b); one judge call per unique
    request. Returns {"rows", "cols", "cells": {row: {col: PairCounts}}}."""
    n = len(examples)
    for name, gens in (("A", gens_a), ("B", gens_b)):
        for k, outs in gens.items():
            if len(outs) != n:
                raise ValueError(f"pairwise: generations {name}[{k}] have {len(outs)} outputs "
                                 f"for {n} instructions")
    cache = {} if cache is None else cache

    def req(ex, r1, r2):
        return Request(str(ex["instruction"]), str(ex.get("input") or ""), r1, r2,
                       ex.get("reference"))

    todo: dict[Request, None] = {}  # insertion-ordered set
    for ka in gens_a:
        for kb in gens_b:
            for i, ex in enumerate(examples):
                a, b = gens_a[ka][i], gens_b[kb][i]
                for r in (req(ex, a, b), req(ex, b, a)):
                    if r not in cache:
                        todo[r] = None
    todo = list(todo)
    if todo:
        raw = judge.judge_many(todo)
        if len(raw) != len(todo):
            raise RuntimeError(f"judge {judge.name!r} returned {len(raw)} verdicts for "
                               f"{len(todo)} requests")
        cache.update(zip(todo, raw))
    cells = {}
    for ka in gens_a:
        cells[ka] = {}
        for kb in gens_b:
            c = PairCounts(total=n)
            for i, ex in enumerate(examples):
                a, b = gens_a[ka][i], gens_b[kb][i]
                o1, u1 = _outcome(cache[req(ex, a, b)], a_first=True)
                o2, u2 = _outcome(cache[req(ex, b, a)], a_first=False)
                for o in (o1, o2):
                    if o == "win":
                        c.wins += 0.5
                    elif o == "loss":
                        c.losses += 0.5
                    else:
                        c.ties += 0.5
                c.unparsable += u1 + u2
                c.order_disagreements += o1 != o2
            cells[ka][kb] = c
    return {"rows": list(gens_a), "cols": list(gens_b), "cells": cells}


# ---------------------------------------------------------------------------- judges
class RougeLJudge:
    """Offline reference-based judge: the response with the higher ROUGE-L F1 against the
    gold answer wins; within `margin` it is a tie. NOT PandaLM."""

    def __init__(self, margin: float = 0.0):
        self.margin = float(margin)
        self.name = "offline ROUGE-L vs reference (not PandaLM)"

    def judge_many(self, requests: Sequence[Request]) -> list[str]:
        out = []
        for r in requests:
            if r.reference is None:
                raise ValueError("the offline ROUGE-L judge needs a reference answer per "
                                 "instruction (the data set's target field)")
            s1, s2 = rouge_l(r.response1, r.reference), rouge_l(r.response2, r.reference)
            out.append("Tie" if abs(s1 - s2) <= self.margin else ("1" if s1 > s2 else "2"))
        return out


DECODINGS = {  # HF generate() settings per named decoding
    "beam": {"num_beams": 4, "early_stopping": True, "repetition_penalty": 1.2},  # PandaLM's
    "greedy": {"num_beams": 1},
}


class HFJudge:
    """A Hugging Face causal LM (e.g. WeOpenML/PandaLM-7B-v1) prompted in PandaLM's format,
    run with torch (CPU is fine for small models); `decoding` is "beam" (PandaLM's) or
    "greedy"; prompts longer than `max_prompt_tokens` (default: the judge's context minus
    `max_new_tokens`) get shorter responses."""

    def __init__(self, folder: str, tokenizer: str | None = None, max_new_tokens: int = 512,
                 batch_size: int = 4, max_prompt_tokens: int | None = None,
                 dtype: str = "float32", decoding: str = "beam"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(folder).is_dir():
            raise FileNotFoundError(f"pairwise.judge: HF judge folder {folder!r} does not exist")
        if decoding not in DECODINGS:
            raise ValueError(f"pairwise.judge_decoding={decoding!r}; expected one of "
                             f"{sorted(DECODINGS)}")
        self.decoding = decoding
        self.name = f"PandaLM-format HF judge ({decoding} decoding): {folder}"
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or folder)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype)).eval()
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        context = getattr(self.model.config, "max_position_embeddings", 2048)
        self.max_prompt_tokens = int(max_prompt_tokens or context - self.max_new_tokens)
        self.generate_kwargs = {**DECODINGS[decoding], "do_sample": False,
                                "max_new_tokens": self.max_new_tokens}

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def fit_prompt(self, r: Request) -> str:
        """PandaLM's prompt for `r`, its responses shortened (from the end, sharing the room
        evenly) until it fits max_prompt_tokens; the instruction and input are kept whole."""
        prompt = pandalm_prompt(r.instruction, r.input, r.response1, r.response2)
        over = self._length(prompt) - self.max_prompt_tokens
        if over <= 0:
            return prompt
        room = self.max_prompt_tokens - self._length(pandalm_prompt(r.instruction, r.input,
                                                                    "", ""))
        toks = [self.tokenizer.encode(_SPECIAL.sub("", x.strip()).strip(),
                                      add_special_tokens=False)
                for x in (r.response1, r.response2)]
        while room > 0:
            n1 = min(len(toks[0]), max(room // 2, room - len(toks[1])))
            n2 = min(len(toks[1]), room - n1)
            prompt = pandalm_prompt(r.instruction, r.input,
                                    self.tokenizer.decode(toks[0][:n1]),
                                    self.tokenizer.decode(toks[1][:n2]))
            over = self._length(prompt) - self.max_prompt_tokens
            if over <= 0:
                return prompt
            room -= over  # re-tokenising the cut text can merge differently: cut more
        raise ValueError(f"pairwise: the instruction (and input) alone need more than the "
                         f"judge's {self.max_prompt_tokens} prompt tokens: "
                         f"{r.instruction[:60]!r}")

    def judge_many(self, requests: Sequence[Request]) -> list[str]:
        import torch

        out = []
        for s in range(0, len(requests), self.batch_size):
            prompts = [self.fit_prompt(r) for r in requests[s:s + self.batch_size]]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
            with torch.no_grad():
                gen = self.model.generate(**enc, **self.generate_kwargs,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return out


def make_judge(spec: str, tokenizer: str = "", max_new_tokens: int = 512,
               batch_size: int = 4, decoding: str = "beam") -> Judge:
    """"rouge-l" (offline, reference-based) or "hf:FOLDER" (PandaLM format; `decoding`
    "beam" = PandaLM's, or "greedy")."""
    if spec in ("rouge-l", "rouge_l", "rougel"):
        return RougeLJudge()
    if spec.startswith("hf:"):
        return HFJudge(spec[3:], tokenizer or None, max_new_tokens, batch_size,
                       decoding=decoding)
    raise ValueError(f"pairwise.judge={spec!r}; expected 'rouge-l' (offline, reference-based) "
                     "or 'hf:FOLDER' (a causal LM prompted in PandaLM's format)")


def matrix_table(matrix: dict, row_label: str, col_label: str) -> str:
    """Poster-style table: rows `row_label layer i`, columns `col_label layer j`, cells
    'W / L / T (score)'."""
    cols = matrix["cols"]

    def cell(x) -> str:
        x = x if isinstance(x, dict) else x.to_dict()
        return f"{x['wins']:g} / {x['losses']:g} / {x['ties']:g} ({x['score']:+.2f})"

    return markdown_table([f"{row_label} \\ {col_label}", *(f"layer {c}" for c in cols)],
                          [[f"layer {r}", *(cell(matrix["cells"][r][c]) for c in cols)]
                           for r in matrix["rows"]])


def matrix_to_json(matrix: dict) -> dict:
    """The matrix with plain-dict cells and string keys (for results.json)."""
    return {"rows": [str(r) for r in matrix["rows"]], "cols": [str(c) for c in matrix["cols"]],
            "cells": {str(r): {str(c): (v if isinstance(v, dict) else v.to_dict())
                               for c, v in row.items()} for r, row in matrix["cells"].items()}}
