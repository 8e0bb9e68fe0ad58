"""Training rows through the chat-template behaviours of the supported families: the loss
falls on each assistant turn and its end-of-turn marker, the rows render exactly as the
template does, and eval prompts equal the training prefix.

The real tokenizers are not reachable offline, so each template below is written for this
test to reproduce what its family's template does to a conversation (none is the family's
file): Llama 3.1 opens with BOS and a dated system header; Qwen2.5 adds a default system
prompt; Qwen3 gives the turn after the last user message an empty think block and drops it
from past turns; Mistral v0.3 moves the system prompt into the last user turn and has no
generation prompt. The last two do not render incrementally."""

import numpy as np
import pytest

from soft_jax.data import formats as D
from soft_jax.data.tokenizer import train_bpe

_SPLIT_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                 "{% set turns = messages[1:] %}{% else %}{% set system = '' %}"
                 "{% set turns = messages %}{% endif %}")
_LAST_USER = ("{% set ns = namespace(last=-1) %}{% for m in turns %}{% if m['role'] == 'user' %}"
              "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}")
TEMPLATES = {
    "llama3": (_SPLIT_SYSTEM + "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
               "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{{ system }}"
               "<|eot_id|>{% for m in turns %}<|start_header_id|>{{ m['role'] }}"
               "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
               "{% endif %}", "<|eot_id|>"),
    "qwen2.5": ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
                "assistant.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>"
                "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                "<|im_end|>\n"),
    "qwen3": ("{% set turns = messages %}" + _LAST_USER + "{% for m in turns %}"
              "{% if m['role'] == 'assistant' and loop.index0 > ns.last %}<|im_start|>assistant\n"
              "<think>\n\n</think>\n\n{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>"
              "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>\n"),
    "mistral": (_SPLIT_SYSTEM + _LAST_USER + "<s>{% for m in turns %}{% if m['role'] == 'user' %}"
                "[INST] {% if system and loop.index0 == ns.last %}{{ system }}\n\n{% endif %}"
                "{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}</s>{% endif %}"
                "{% endfor %}", "</s>"),
}
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tom has 3 apples and buys 4. How many?"},
                {"role": "assistant", "content": "3 + 4 = 7"},
                {"role": "user", "content": "And if he eats 2?"},
                {"role": "assistant", "content": "7 - 2 = 5"}]


@pytest.fixture(scope="module")
def base_tok():
    words = "system user assistant Cutting Knowledge Date Tom apples buys How many eats brief"
    return train_bpe([words + " 0123456789 [INST] <think> </think>"] * 5, 320)


def _tok(base, family):
    tok = base.__class__(tokenizer_object=base.backend_tokenizer, bos_token="<s>",
                         eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = TEMPLATES[family][0]
    return tok


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_multi_turn_targets_are_the_assistant_turns(base_tok, family):
    tok, end_of_turn = _tok(base_tok, family), TEMPLATES[family][1]
    (ids, mask), = D.tokenize_rows([{"messages": CONVERSATION}], "chat", tok, 1024,
                                   template="chat")
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ids[mask]) == f"3 + 4 = 7{end_of_turn}7 - 2 = 5{end_of_turn}"
    assert tok.decode(ids[~mask]).count("Be brief.") == 1


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_single_turn_row_and_eval_prompt(base_tok, family):
    tok, end_of_turn = _tok(base_tok, family), TEMPLATES[family][1]
    row = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}
    (ids, mask), = D.tokenize_rows([row], "gsm8k", tok, 1024, template="chat")
    first = int(np.argmax(mask))
    assert not mask[:first].any() and mask[first:].all()
    assert tok.decode(ids[mask]).endswith(f"#### 7{end_of_turn}")
    assert D.prompt_ids_for(tok, row["question"], chat=True) == ids[:first].tolist()


def test_a_template_that_drops_the_assistant_text_is_refused(base_tok):
    tok = _tok(base_tok, "qwen2.5")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                         "{% else %}[{{ loop.length }}]{% endif %}{% endfor %}")
    with pytest.raises(D.DataError, match="data.template='plain'"):
        D.tokenize_rows([{"messages": CONVERSATION}], "chat", tok, 1024, template="chat")
