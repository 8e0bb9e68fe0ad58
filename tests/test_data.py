"""Data pipeline: formats, prompt masks, truncation counts, packing, bad rows, resumable order."""

import json

import numpy as np
import pytest

from soft_jax.data import formats as D
from soft_jax.data.tokenizer import train_bpe

from conftest import CHATML


@pytest.fixture(scope="module")
def tok():
    texts = [D.ALPACA_PROMPT, "the quick brown fox jumps over the lazy dog 0123456789 ####"] * 5
    return train_bpe(texts, 300)


def test_alpaca_template_and_prompt_mask(tok):
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Add", "input": "2 and 3", "output": "5"}]
    ex = D.tokenize_rows(rows, "alpaca", tok, 512)
    ids, mask = ex[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    text_targets = tok.decode(ids[mask], skip_special_tokens=True)
    assert text_targets == "hi"
    assert "### Input:\n2 and 3" in tok.decode(ex[1][0])
    assert "### Input" not in tok.decode(ex[0][0])


def test_formats(tok):
    trivia = {"question": "Capital of France?", "answer": {"value": "Paris",
                                                           "aliases": ["Paris", "paris"]}}
    assert D.triviaqa_answer(trivia, 0) == ("Paris", ["Paris", "Paris", "paris"])
    assert D.triviaqa_segments({"question": "q", "answers": ["a", "b"]}, 0)[1] == (" a", True)
    chat = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "yo"},
                              {"from": "human", "value": "more"}, {"from": "gpt", "value": "ok"}]}
    segs = D.chat_segments(chat, 0)
    assert [t for t, target in segs if target] == ["yo\n", "ok\n"]
    msgs = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert D.chat_segments(msgs, 0)[-1] == ("b\n", True)
    assert D.text_segments({"text": "abc"}, 0) == [("abc", True)]
    assert D.gsm8k_segments({"question": "q", "answer": "x #### 4"}, 0)[1] == ("x #### 4", True)


def test_malformed_rows_error_or_skip(tok):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": 3,
                                                                         "output": "x"}]
    with pytest.raises(D.DataError, match=r"row 1: field 'output' missing \(alpaca"):
        D.tokenize_rows(rows, "alpaca", tok, 64)
    stats = D.DataStats()
    ex = D.tokenize_rows(rows, "alpaca", tok, 64, on_bad_row="skip", stats=stats)
    assert len(ex) == 1 and stats.skipped == 2 and "row 2: field 'instruction'" in \
        stats.skipped_reasons[1]
    with pytest.raises(ValueError, match="data.format"):
        D.tokenize_rows(rows, "nope", tok, 64)


def test_truncation_is_counted_not_dropped(tok):
    rows = [{"text": "fox " * 200}, {"text": "dog"}]
    stats = D.DataStats()
    ex = D.tokenize_rows(rows, "text", tok, 16, stats=stats)
    assert len(ex) == 2 and stats.truncated == 1 and len(ex[0][0]) == 17


def test_packing_segments_positions_and_masks():
    a = (np.array([1, 5, 6, 2]), np.array([0, 0, 1, 1], bool))
    b = (np.array([1, 7, 2]), np.array([0, 1, 1], bool))
    c = (np.array([1, 8, 9, 10, 11, 2]), np.array([0, 0, 0, 1, 1, 1], bool))
    out = D.pack_examples([a, b, c], seq_len=8, pack=True, pad_id=0)
    assert out["input_ids"].shape == (2, 8)
    np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(out["positions"][0], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["input_ids"][0, :5], [1, 5, 6, 1, 7])
    np.testing.assert_array_equal(out["targets"][0, :5], [5, 6, 2, 7, 2])
    np.testing.assert_array_equal(out["loss_mask"][0], [0, 1, 1, 1, 1, 0, 0, 0])
    padded = D.pack_examples([a, b], seq_len=8, pack=False)
    assert padded["input_ids"].shape == (2, 8) and padded["segment_ids"][1].tolist() == \
        [1, 1, 0, 0, 0, 0, 0, 0]


def test_batch_stream_is_deterministic_and_crosses_epochs():
    exs = [(np.arange(1, n + 2), np.ones(n + 1, bool)) for n in range(3, 13)]
    s1 = D.BatchStream(exs, 16, 3, seed=7)
    s2 = D.BatchStream(exs, 16, 3, seed=7)
    for k in (0, 5, 2, 9):
        for key in s1.batch(k):
            np.testing.assert_array_equal(s1.batch(k)[key], s2.batch(k)[key])
    assert s1.position(5)["epoch"] == (5 * 3) // s1.rows_per_epoch
    assert not np.array_equal(D.BatchStream(exs, 16, 3, seed=8).batch(0)["input_ids"],
                              s1.batch(0)["input_ids"])


def test_local_files_and_missing_files(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(3)))
    assert [r["text"] for r in D.load_rows(str(p))] == ["row 0", "row 1", "row 2"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_rows(str(tmp_path / "missing.jsonl"))
    assert len(D.load_rows("gsm8k_demo:heldout")) == 200


@pytest.fixture
def chat_tok():
    t = train_bpe([D.ALPACA_PROMPT, "<|im_start|> user assistant <|im_end|> 0123456789"] * 5, 300)
    t.chat_template = CHATML
    return t


def test_chat_template_loss_on_the_assistant_turn_only(chat_tok):
    row = {"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"}
    (ids, mask), = D.tokenize_rows([row], "gsm8k", chat_tok, 512, template="chat")
    assert chat_tok.decode(ids[mask]) == "2 + 3 = 5\n#### 5<|im_end|>\n"
    prompt = D.chat_prompt(chat_tok, [{"role": "user", "content": row["question"]}])
    assert chat_tok.decode(ids[~mask]) == prompt  # no extra BOS / EOS around the template
    n = len(chat_tok.encode(prompt, add_special_tokens=False))
    assert not mask[:n].any() and mask[n:].all()
    auto, = D.tokenize_rows([row], "gsm8k", chat_tok, 512, template="auto")
    np.testing.assert_array_equal(auto[0], ids)


def test_chat_template_multi_turn_and_alpaca(chat_tok):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "and?"}, {"role": "assistant", "content": "4"}]}
    (ids, mask), = D.tokenize_rows([row], "chat", chat_tok, 512, template="chat")
    assert chat_tok.decode(ids[mask]) == "yo<|im_end|>\n4<|im_end|>\n"
    alp = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    (ids, mask), = D.tokenize_rows([alp], "alpaca", chat_tok, 512, template="chat")
    assert "user\nAdd\n\n2 and 3<|im_end|>" in chat_tok.decode(ids)


def test_template_resolution(tok, chat_tok):
    assert D.resolve_template("auto", tok, "gsm8k") == "plain"  # no chat template
    assert D.resolve_template("auto", chat_tok, "gsm8k") == "chat"
    assert D.resolve_template("auto", chat_tok, "text") == "plain"
    assert D.resolve_template("plain", chat_tok, "gsm8k") == "plain"
    with pytest.raises(ValueError, match="no chat_template"):
        D.resolve_template("chat", tok, "gsm8k")
    with pytest.raises(ValueError, match="data.template='nope'"):
        D.resolve_template("nope", chat_tok, "gsm8k")
    with pytest.raises(D.DataError, match="data.template='plain'"):
        D.tokenize_rows([{"text": "abc"}], "text", chat_tok, 64, template="chat")
    plain, = D.tokenize_rows([{"question": "q", "answer": "a"}], "gsm8k", chat_tok, 64)
    assert plain[0][0] == chat_tok.bos_token_id  # the default stays plain
