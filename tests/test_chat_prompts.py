"""Eval prompts and `generate --chat` use the same chat template as training
(data.template='chat'): the prompt is exactly the non-target prefix of a training row."""

import numpy as np
import pytest

from soft_jax.data import formats as D
from soft_jax.eval import prompting as runner
from soft_jax.data.formats import prompt_ids_for
from soft_jax.data.tokenizer import train_bpe

from conftest import CHATML

ROW = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(["<|im_start|> user assistant <|im_end|> Tom has apples 0123456789"] * 5, 300)
    t.chat_template = CHATML
    return t


def _training_prompt(tok, row, fmt="gsm8k"):
    (ids, mask), = D.tokenize_rows([row], fmt, tok, 512, template="chat")
    return ids[:int(np.argmax(mask))].tolist()


def test_eval_prompts_equal_the_training_prefix(tok):
    want = _training_prompt(tok, ROW)
    text = runner.gsm8k_prompt(ROW["question"], [], tok)
    assert runner.encode_prompt(tok, text, 2048, bos=False) == want
    item, = runner.instruction_items([ROW], "gsm8k", tok)
    assert runner.encode_prompt(tok, item["prompt"], 2048, bos=False) == want
    assert item["reference"] == ROW["answer"]
    few = runner.gsm8k_prompt(ROW["question"], [ROW], tok)  # a worked exchange first
    assert few.count("<|im_start|>assistant") == 2 and few.endswith("<|im_start|>assistant\n")
    plain = runner.gsm8k_prompt(ROW["question"], [])  # no tokenizer: the plain template
    assert plain == D.GSM8K_PROMPT.format(question=ROW["question"])


def test_generate_chat_prompt_ids(tok):
    assert prompt_ids_for(tok, ROW["question"], chat=True) == _training_prompt(tok, ROW)
    assert prompt_ids_for(tok, "hi", chat=False) == tok("hi")["input_ids"]
    bare = train_bpe(["hello world"] * 5, 270)
    with pytest.raises(ValueError, match="no chat_template"):
        prompt_ids_for(bare, "hi", chat=True)
