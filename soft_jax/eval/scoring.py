"""Answer scoring: GSM8K answer extraction, TriviaQA exact match (both flavours), ROUGE-L.

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
  * a `-` glued to a preceding word or digit is a hyphen, not a sign ("3-4" -> 3 and 4).

TriviaQA: `normalize=True` is the SQuAD / TriviaQA evaluation normaliser (lowercase, delete
punctuation, drop the articles a/an/the, collapse whitespace; the curly quotes and backtick
that TriviaQA's script adds count as punctuation too); `normalize=False` is the paper's
case-sensitive exact match (strings equal after stripping surrounding whitespace).
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_NUMBER = re.compile(
    r"(?<![\w.])"                                    # not glued to a word, digit or dot
    r"(?P<neg1>[-\u2212]\s?)?\$?\s?(?P<neg2>[-\u2212])?"  # -$5, $-5, -5, $5
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)"
    r"(?:/(?P<den>\d+)(?![\d,]|\.\d))?")
_HASHES = "####"


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


def gsm8k_correct(prediction_text: str, gold_text: str) -> bool:
    """True when both texts yield the same canonical answer (and the gold one has one)."""
    gold = extract_gsm8k_answer(gold_text)
    return gold is not None and extract_gsm8k_answer(prediction_text) == gold


# ------------------------------------------------------------------------------ TriviaQA
_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u00b4", "`"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD/TriviaQA normaliser: lowercase, delete punctuation, drop a/an/the, collapse
    whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def triviaqa_exact_match(prediction: str, aliases, normalize: bool = True) -> bool:
    """Exact match of `prediction` against any of `aliases` (a string or a list of them).

    normalize=True: the standard normalised EM; False: the paper's case-sensitive EM
    (equal after stripping surrounding whitespace). An empty prediction never matches.
    """
    if prediction is None:
        return False
    if isinstance(aliases, str):
        aliases = [aliases]
    prep = normalize_answer if normalize else str.strip
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
_TOKEN = re.compile(r"\w+")


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lowercased word tokens (the `rouge-score` definition, no stemming)."""
    c = _TOKEN.findall(candidate.lower())
    r = _TOKEN.findall(reference.lower())
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)
