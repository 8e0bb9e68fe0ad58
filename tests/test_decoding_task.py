"""The `decoding` eval task on a tiny random checkpoint at its default size: every row's
fields, speculative rows token-identical to greedy, Markdown + JSON + PNG written."""

import json

import pytest

from soft_jax.eval.config import default_config, validate
from soft_jax.eval.runner import run_eval

from conftest import make_hf_model


def test_decoding_task_rows_and_outputs(tmp_path):
    from soft_jax.data.tokenizer import train_bpe
    from soft_jax.data.formats import gsm8k_demo_rows

    rows = gsm8k_demo_rows("train")[:40]
    tok = train_bpe((r["question"] + " " + r["answer"] for r in rows), 300)
    folder, _ = make_hf_model(tmp_path, vocab=len(tok), hidden=32, inter=64, layers=4, heads=2,
                              kv_heads=1)
    tok.save_pretrained(folder)
    c = default_config()
    c.hf, c.out_dir, c.exits, c.tasks = str(folder), str(tmp_path / "out"), (2, 3, 4), ("decoding",)
    c.decoding.max_new_tokens, c.max_prompt_tokens = 8, 192  # else the default size
    res = run_eval(c)["decoding"]
    modes = [(r["mode"], r.get("draft_exit", r.get("exit"))) for r in res["rows"]]
    assert modes[:5] == [("greedy", 4), ("greedy", 2), ("greedy", 3), ("speculative", 2),
                         ("speculative", 3)]
    assert [m for m, _ in modes[5:]] == ["dynamic"] * 4 and modes[5][1] == "2:4"
    for r in res["rows"]:
        assert {"mode", "ms_per_token", "speedup", "rejection_ratio", "identical_to_greedy",
                "quality", "mean_exit_layer"} <= set(r) and r["ms_per_token"] > 0
        if r["mode"] == "speculative":
            assert r["identical_to_greedy"] and 0 <= r["rejection_ratio"] <= 1
    assert res["rows"][0]["speedup"] == 1.0 and res["rows"][0]["identical_to_greedy"]
    assert res["baseline_drift"] == res["baseline_ms_per_token_last"] / res["baseline_ms_per_token"]
    assert set(res["acceptance"]) == {"2", "3"}
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())["decoding"]["rows"]
    assert len(saved) == len(res["rows"])
    assert "## Decoding speed" in (out / "report.md").read_text()
    assert (out / "decoding.png").is_file()


def test_bad_sweep_names_the_field():
    c = default_config()
    c.hf = "x"
    c.decoding.sweep = (0.5, 1.5)
    with pytest.raises(ValueError, match="config.decoding.sweep"):
        validate(c)
