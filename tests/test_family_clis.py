"""The eval, harness, generate and convert CLIs and bench/decode.py on tiny random models of
the newer families (a windowed Mistral, Qwen3 with q/k norm and a decoupled head_dim, Qwen2
with biases, Llama 3 RoPE scaling), each with a ChatML tokenizer; test_families.py covers
the same models' parity, training and decoding through the library."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import CHATML, make_hf_model
from soft_jax.cli.main import main
from test_families import FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "decode.py"


@pytest.fixture(scope="module")
def tok():
    from soft_jax.data.formats import gsm8k_demo_rows
    from soft_jax.data.tokenizer import train_bpe

    rows = gsm8k_demo_rows("train")[:40]
    t = train_bpe(["<|im_start|> user assistant <|im_end|>"] * 5
                  + [r["question"] + " " + r["answer"] for r in rows], 300)
    t.chat_template = CHATML
    return t


def _folder(tmp_path, tok, name):
    folder, _ = make_hf_model(tmp_path, name, vocab=len(tok), hidden=48, inter=64, layers=3,
                              bos_token_id=None, eos_token_id=tok.eos_token_id,
                              **FAMILIES[name])
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["mistral", "qwen3"])
def test_eval_loss_and_decoding_tasks(tmp_path, tok, name, capsys):
    folder, out = _folder(tmp_path, tok, name), tmp_path / "eval"
    rc = main(["eval", "--hf", str(folder), "--exits", "1,3", "--out", str(out), "--tasks",
               "loss,decoding", "--config.loss.max_examples=8", "--config.max_prompt_tokens=96",
               "--config.decoding.max_new_tokens=8", "--config.decoding.sweep=(0.9,)"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert set(res["loss"]["per_exit"]) == {"1", "3"}
    spec = [r for r in res["decoding"]["rows"] if r["mode"] == "speculative"]
    assert spec and all(r["identical_to_greedy"] for r in spec)


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_harness_and_generate(tmp_path, tok, name, capsys):
    folder, out = _folder(tmp_path, tok, name), tmp_path / "harness"
    rc = main(["harness", "--hf", str(folder), "--exits", "2,3", "--tasks", "soft_gsm8k_ppl",
               "--limit", "2", "--batch-size", "2", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert set(json.loads((out / "results.json").read_text())["results"]) == {"2", "3"}
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "from-hf", "--hf", str(folder), "--out", str(ckpt)]) == 0
    capsys.readouterr()
    for mode in ([], ["--draft-exit", "1"], ["--dynamic", "--exits", "1,2"]):
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", "Tom has 3 apples", "--chat",
                     "--max-new-tokens", "6", *mode]) == 0
    assert capsys.readouterr().out.strip()


def test_decode_bench_on_a_windowed_model(tmp_path, tok):
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    bench.main(["--hf", str(_folder(tmp_path, tok, "mistral")), "--exits", "1,3",
                "--new-tokens", "8", "--repeats", "1", "--bandwidth-mib", "4", "--json",
                str(out)])
    rows = {(r["system"], r["mode"], r["exit"]): r for r in json.loads(out.read_text())}
    assert rows[("soft_jax", "speculative", 1)]["identical_to_greedy"] is True
    # transformers runs the same windowed weights: its greedy tokens equal soft_jax's
    assert rows[("transformers", "eager", None)]["identical_to_greedy"] is True
