"""soft_jax.eval.harness: the lm-eval adapter's log-likelihoods against exit_logits and against
lm-eval's own Hugging Face backend, its generations against soft_jax.generate, and the
per-exit CLI on the offline tasks (tiny random model, BPE tokenizer that adds BOS)."""

import json

import numpy as np
import pytest
from lm_eval.api.instance import Instance

import soft_jax as sj
from soft_jax.cli.harness import main
from soft_jax.eval.harness import SoftJaxLM
from soft_jax.eval.harness_tasks import gsm8k_test_file

from conftest import make_hf_model

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer random HF LLaMA folder with a GSM8K-trained BPE that prepends <s>."""
    from tokenizers import processors

    from soft_jax.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("harness")
    rows = [json.loads(x) for x in gsm8k_test_file().read_text().splitlines()[:40]]
    tok = train_bpe((r["question"] + " " + r["answer"] for r in rows), 300)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    folder, _ = make_hf_model(root, "m", vocab=len(tok), hidden=32, inter=64, layers=3,
                              heads=2, kv_heads=1, seed=3)
    tok.save_pretrained(folder)
    return folder, tok


REQS = [("Question: Tom has 3 apples", " and eats 1."), ("A", "B C"), ("", "Paris is big"),
        ("Question: 2 + 2 =  ", "4"), ("<s>Start", " here")]


def _ll(lm, reqs=REQS):
    return lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)])


def _manual_ll(tok, config, params, exit_layer, ctx, cont):
    """What the HF backend scores, computed directly from exit_logits."""
    n_sp = len(ctx) - len(ctx.rstrip())
    ctx, cont = (ctx[:-n_sp], ctx[-n_sp:] + cont) if n_sp else (ctx, cont)
    kw = {"add_special_tokens": False} if ctx.startswith("<s>") else {}
    if ctx:
        whole, c_ids = tok.encode(ctx + cont, **kw), tok.encode(ctx, **kw)
        cont_ids, seq = whole[len(c_ids):], whole
    else:
        cont_ids = tok.encode(cont, add_special_tokens=False)
        seq = [tok.bos_token_id] + cont_ids
    logits = np.asarray(sj.exit_logits(config, params, np.asarray([seq[:-1]]),
                                       exits=(exit_layer,))[exit_layer])[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) \
        - logits.max(-1, keepdims=True)
    pos = np.arange(len(seq) - 1 - len(cont_ids), len(seq) - 1)
    return float(logp[pos, cont_ids].sum()), bool((logits[pos].argmax(-1) == cont_ids).all())


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_loglikelihood_equals_exit_logits(tiny, exit_layer):
    folder, tok = tiny
    lm = SoftJaxLM(hf=str(folder), exit=exit_layer, batch_size=2)
    config, params = sj.load_hf(folder)
    got = _ll(lm)
    for (ctx, cont), (lp, greedy) in zip(REQS, got):
        want_lp, want_greedy = _manual_ll(tok, config, params, exit_layer, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    assert lm.tok_encode("Tom")[0] == tok.bos_token_id  # the tokenizer's BOS is kept


def test_last_exit_matches_lm_eval_hf_backend(tiny):
    from lm_eval.models.huggingface import HFLM

    folder, _ = tiny
    ours = SoftJaxLM(hf=str(folder), batch_size=3, max_length=24)
    theirs = HFLM(pretrained=str(folder), backend="causal", device="cpu", batch_size=3,
                  max_length=24)
    reqs = REQS + [("Question: " + "a long context " * 8, " that gets cut from the left")]
    for (lp, g), (lp2, g2) in zip(_ll(ours, reqs), _ll(theirs, reqs)):
        assert lp == pytest.approx(lp2, abs=1e-4) and g == g2
    texts = [("Janet's ducks lay 16 eggs per day. " * 4,), ("x",)]
    roll = [Instance("loglikelihood_rolling", {}, t, i) for i, t in enumerate(texts)]
    assert ours.loglikelihood_rolling(roll) == pytest.approx(
        theirs.loglikelihood_rolling(roll), abs=1e-4)


def test_generate_until_equals_soft_jax_generate(tiny):
    folder, tok = tiny
    config, params = sj.load_hf(folder)
    lm = SoftJaxLM(hf=str(folder), exit=2, batch_size=2)
    prompts = ["Question: Tom has 3 apples.\nAnswer:", "Question: 5 + 5\nAnswer:", "Hi"]
    kwargs = [{"until": ["Question:"], "max_gen_toks": 7, "do_sample": False},
              {"until": ["Question:"], "max_gen_toks": 7, "do_sample": False},
              {"until": ["e", "\n"], "max_gen_toks": 5}]
    got = lm.generate_until([Instance("generate_until", {}, (p, k), i)
                             for i, (p, k) in enumerate(zip(prompts, kwargs))])
    for p, k, text in zip(prompts, kwargs, got):
        toks = sj.generate(config, params, [tok.encode(p)], k["max_gen_toks"],
                           exit_layer=2).tokens[0]
        want = tok.decode(toks, skip_special_tokens=True)
        for stop in k["until"] + [tok.eos_token]:
            want = want.split(stop)[0]
        assert text == want
    assert all("e" not in t and "\n" not in t for t in got[2:])


def test_cli_writes_the_exit_by_task_table(tiny, tmp_path, capsys):
    folder, _ = tiny
    out = tmp_path / "out"
    rc = main(["--hf", str(folder), "--exits", "1,3", "--tasks",
               "soft_arith_mc,soft_gsm8k,soft_gsm8k_ppl", "--limit", "2", "--max-gen-toks",
               "8", "--batch-size", "4", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["exits"] == [1, 3] and set(res["results"]) == {"1", "3"}
    for e in ("1", "3"):
        r = res["results"][e]
        assert set(r["soft_gsm8k"]) == {"exact_match,strict-match",
                                        "exact_match,flexible-extract"}
        assert 0 <= r["soft_arith_mc"]["acc,none"] <= 1
        assert r["soft_gsm8k_ppl"]["word_perplexity,none"] > 1
    md = (out / "results.md").read_text()
    assert "| exit | soft_arith_mc acc,none |" in md and md.count("\n| ") == 3
    assert (out / "metrics_per_exit.png").stat().st_size > 1000
    samples = [json.loads(x) for x in (out / "samples_exit3.jsonl").open()]
    assert {s["task"] for s in samples} == {"soft_arith_mc", "soft_gsm8k", "soft_gsm8k_ppl"}


@pytest.mark.parametrize("args,msg", [
    (["--exits", "9"], "--exits"), (["--include-path", "/no/such"], "--include-path"),
    (["--tasks", " , "], "--tasks"),
])
def test_cli_errors_name_the_argument(tiny, tmp_path, capsys, args, msg):
    base = {"--hf": str(tiny[0]), "--tasks": "soft_arith_mc", "--output": str(tmp_path)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    assert main([x for kv in base.items() for x in kv]) == 2
    assert msg in capsys.readouterr().err


def test_model_args_are_checked(tiny):
    with pytest.raises(ValueError, match="batch_size"):
        SoftJaxLM(hf=str(tiny[0]), batch_size=0)
    with pytest.raises(ValueError, match="unknown argument"):
        SoftJaxLM(hf=str(tiny[0]), exits=2)
    with pytest.raises(ValueError, match="model_args.exit"):
        SoftJaxLM(hf=str(tiny[0]), exit=4)
