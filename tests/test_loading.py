"""load_model: one loader for soft_jax checkpoints, work dirs and Hugging Face folders, with the
tokenizer saved beside the weights, a dtype, exits and a mesh."""

import jax
import numpy as np
import pytest

import soft_jax as sj
from soft_jax.parallel import sharding as shd
from soft_jax.io.checkpoint import save_params
from soft_jax.io.loading import TokenizerError, load_model

CFG = sj.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=3,
                     num_heads=2, num_kv_heads=1, head_dim=8, exits=(1, 2))


def word_tokenizer(folder, vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    return folder


def same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x, np.float32),
                                                            np.asarray(y, np.float32)), a, b)


def test_checkpoint_and_hf_folder_load_the_same_model(tmp_path):
    params = sj.init_params(CFG, jax.random.PRNGKey(0))
    tok_dir = word_tokenizer(tmp_path / "tok", CFG.vocab_size)
    ckpt = save_params(tmp_path / "ckpt", CFG, params, tokenizer_dir=tok_dir)
    hf = sj.save_hf(CFG, params, tmp_path / "hf")

    m = load_model(ckpt)
    assert m.config == CFG and m.source.startswith("soft_jax checkpoint")
    same(m.params, params)
    assert m.tokenizer("w3 w5")["input_ids"] == [3, 5]
    m = load_model(hf, exits=(1, 2), mesh=shd.build_mesh({"data": 1}))
    assert m.config.resolved_exits == (1, 2, 3) and m.source.startswith("Hugging Face folder")
    same(m.params, params)
    assert isinstance(m.params["embed"]["embedding"].sharding, jax.sharding.NamedSharding)
    assert m.tokenizer is None  # no tokenizer files in the HF folder

    m = load_model(ckpt, "bfloat16", exits=(2,), tokenizer=False)
    assert m.tokenizer is None and m.config.resolved_exits == (2, 3)
    assert m.config.param_dtype == "bfloat16" and m.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(m.params)} == {np.dtype("bfloat16")}
    assert len(load_model(hf, tokenizer=str(tok_dir)).tokenizer) == CFG.vocab_size

    with pytest.raises(TokenizerError, match="vocab_size is 40"):
        load_model(hf, tokenizer=str(word_tokenizer(tmp_path / "big", 50)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
