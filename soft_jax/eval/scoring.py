"""Answer scoring: GSM8K answer extraction (ours and lm-eval's), TriviaQA exact match with the
official normaliser, ROUGE-L.

GSM8K numbers are returned in one canonical string form so that "1,234.50", "$1234.5" and
"1234.50" all compare equal:
  * commas between digit groups, a `$` (before or after the sign), units and a trailing `.`
    are dropped; trailing zeros of a decimal go ("5.00" -> "5", "1234.50" -> "1234.5");
    "-0" is "0";
  * the number after the first `####` that has one wins over any other number; without a
    `####` (or with no number after it) the last number in the text is the answer;
  * a fraction written `a/b` (integers, no spaces) is one number with value a/b: its exact
    decimal when that terminates ("3/4" -> "0.75", "10/4" -> "2.5", "6/3" -> "2"), otherwise
    the reduced fraction ("2/6" -> "1/3"); a zero denominator leaves just "a";
  * a minus is a sign only when glued to the number (or to its `$`) and not after an operand:
    "3-4" (hyphen), "30 - 12", "30 -12" and "(5) -2" are binary minus (-> "12", "2"); "-5",
    "= -5", "to -5", "3 - -2" and "-$5" have a negative number; "- 5" (a list bullet) is 5.

`lm_eval_gsm8k` re-implements lm-evaluation-harness's two GSM8K filters (`strict-match`:
the first "#### N"; `flexible-extract`: the last number-like run) and its exact match, so
results are comparable with published lm-eval numbers.

TriviaQA: `normalize=True` uses the official TriviaQA evaluation normaliser
(`normalize_triviaqa`: `_` and punctuation, curly quotes and backtick included, become
spaces; lowercase; articles a/an/the dropped; whitespace collapsed: "Jay-Z" == "Jay Z");
`normalize=False` is the SoFT paper's case-sensitive exact match (strings equal after
stripping surrounding whitespace). `normalize_squad` is SQuAD v1.1's normaliser (punctuation
deleted, not spaced: "Jay-Z" -> "jayz"), kept for comparison only.
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_NUMBER = re.compile(
    r"(?<![\w.])"                                    # not glued to a word, digit or dot
    r"(?P<neg1>[-\u2212])?(?:\$\s?)?(?P<neg2>[-\u2212])?"  # -$5, $-5, -5, $5
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)"
    r"(?:/(?P<den>\d+)(?![\d,]|\.\d))?")
_HASHES = "####"
_OPERAND_END = re.compile(r"[\d)\]%]\s*$")  # a minus after one of these is binary


def _canonical_decimal(d: Decimal) -> str:
    if d == 0:
        return "0"
    text = format(d.normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def canonical_number(match: re.Match) -> str | None:
    """The canonical string of one `_NUMBER` match."""
    neg = bool(match.group("neg1") or match.group("neg2"))
    if match.group("neg1") and _OPERAND_END.search(match.string, 0, match.start()):
        neg = bool(match.group("neg2"))  # "30 - 12": subtraction, not a negative 12
    raw = match.group("num").replace(",", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:  # pragma: no cover - the regex only admits valid numbers
        return None
    den = match.group("den")
    if den is not None and "." not in raw and int(den) != 0:
        frac = Fraction(int(raw), int(den))
        d = frac.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        if d != 1:  # a repeating decimal: keep the exact reduced fraction
            return ("-" if neg and frac else "") + f"{frac.numerator}/{frac.denominator}"
        value = Decimal(frac.numerator) / Decimal(frac.denominator)
    return _canonical_decimal(-value if neg else value)


def _numbers(text: str) -> list[str]:
    return [n for n in (canonical_number(m) for m in _NUMBER.finditer(text)) if n is not None]


def extract_gsm8k_answer(text: str | None) -> str | None:
    """The answer number of a GSM8K solution or model output, canonical, or None.

    "#### 1,000" -> "1000"; "The answer is 42 apples." -> "42"; "$5.00" -> "5"; no number
    -> None. See the module doc for the exact rules.
    """
    if not text:
        return None
    parts = text.split(_HASHES)
    for after in parts[1:]:  # the first `####` followed by a number wins
        nums = _numbers(after.split(_HASHES)[0])
        if nums:
            return nums[0]
    nums = _numbers(text)
    return nums[-1] if nums else None


# lm-evaluation-harness's GSM8K scoring (tasks/gsm8k/gsm8k.yaml, metadata version 3.0): two
# regex filters over the generation (already cut at "Question:"), then exact match after
# deleting these patterns from prediction and gold, case-insensitively.
LM_EVAL_GSM8K_FILTERS = {
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),  # the first "#### N"
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),  # the last number
}
_LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
LM_EVAL_INVALID = "[invalid]"


def lm_eval_gsm8k_extract(generation: str, filter_name: str) -> str:
    """What lm-eval's GSM8K filter `filter_name` keeps of a generation ("[invalid]" if none)."""
    regex, group = LM_EVAL_GSM8K_FILTERS[filter_name]
    found = regex.findall(generation or "")
    if not found:
        return LM_EVAL_INVALID
    hit = found[group]
    if isinstance(hit, tuple):  # several groups: the first non-empty one
        hit = next((h for h in hit if h), LM_EVAL_INVALID)
    return hit.strip()


def _lm_eval_clean(text: str) -> str:
    for pattern in _LM_EVAL_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def lm_eval_gsm8k(generation: str, gold_answer: str) -> dict[str, bool]:
    """lm-eval's GSM8K exact match of one generation against the data set's full answer
    text, per filter: {"strict-match": bool, "flexible-extract": bool}."""
    gold = _lm_eval_clean(gold_answer)
    return {name: _lm_eval_clean(lm_eval_gsm8k_extract(generation, name)) == gold
            for name in LM_EVAL_GSM8K_FILTERS}


# ------------------------------------------------------------------------------ TriviaQA
_QUOTES = "\u2018\u2019\u00b4`"  # the official TriviaQA script's extra punctuation
_TRIVIAQA_PUNCT = set(string.punctuation + _QUOTES)
_SQUAD_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_triviaqa(text: str) -> str:
    """The official TriviaQA evaluation normaliser: `_` and punctuation (curly quotes and
    backtick included) become spaces, lowercase, drop a/an/the, collapse whitespace."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _TRIVIAQA_PUNCT else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_squad(text: str) -> str:
    """SQuAD v1.1's normaliser (punctuation deleted, not spaced): for comparison only."""
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def triviaqa_exact_match(prediction: str, aliases, normalize: bool = True) -> bool:
    """Exact match of `prediction` against any of `aliases` (a string or a list of them).

    normalize=True: EM after the official TriviaQA normaliser; False: the paper's
    case-sensitive EM (equal after stripping surrounding whitespace). An empty prediction
    never matches.
    """
    if prediction is None:
        return False
    if isinstance(aliases, str):
        aliases = [aliases]
    prep = normalize_triviaqa if normalize else str.strip
    pred = prep(prediction)
    if not pred:
        return False
    return any(pred == prep(a) for a in aliases if isinstance(a, str))


def triviaqa_prediction(generated: str) -> str:
    """The answer part of a generated TriviaQA continuation: its first non-empty line,
    stripped (greedy outputs often run on with a new "Question:")."""
    text = generated.split("Question:")[0]
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def cut_at_next_question(generated: str) -> str:
    """A GSM8K continuation up to where the model starts a new "Question:" (few-shot runs)."""
    return generated.split("\nQuestion:")[0].split("Question:")[0] if generated else ""


# ------------------------------------------------------------------------------ ROUGE-L
_ROUGE: dict[bool, object] = {}


def rouge_l(candidate: str, reference: str, stem: bool = False) -> float:
    """ROUGE-L F1 from Google's `rouge-score` package (its tokenizer: lowercase ASCII words
    and digits; Porter stemming when `stem`)."""
    if stem not in _ROUGE:
        from rouge_score import rouge_scorer

        _ROUGE[stem] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
    return float(_ROUGE[stem].score(reference, candidate)["rougeL"].fmeasure)
