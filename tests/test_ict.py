"""ICT (one LM head per non-final exit): decoding at an exit reads that exit's own head, and
the exported sub-model carries it as its LM head."""

import jax
import numpy as np
import pytest

import soft_jax as sj
from soft_jax.io.checkpoint import save_params
from soft_jax.cli.convert import main as convert_main
from soft_jax.io.hf import submodel
from soft_jax.infer.generate import generate

PROMPT, N = [5, 7, 9, 11, 3], 8


def ict_model(tie: bool):
    """A tiny ICT model whose heads are scaled up (near-uniform logits make argmax flaky) and
    differ from the shared head, so reading the wrong head changes the tokens."""
    cfg = sj.LlamaConfig(vocab_size=89, hidden_size=32, intermediate_size=64, num_layers=4,
                         num_heads=4, num_kv_heads=2, exits=(1, 2, 3), num_exit_heads=3,
                         tie_word_embeddings=tie, max_position_embeddings=64,
                         eos_token_id=None, bos_token_id=None)
    params = jax.jit(sj.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(3))
    params["exit_heads"]["kernel"] = params["exit_heads"]["kernel"] * 30
    if tie:
        params["embed"]["embedding"] = params["embed"]["embedding"] * 20
    else:
        params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 30
    return cfg, params


def test_decoding_at_an_exit_reads_its_ict_head():
    # the heads are independent random matrices: tokens read from the shared head or another
    # exit's head would not be the argmax of this exit's full-recomputation logits
    cfg, params = ict_model(tie=False)
    for e in cfg.resolved_exits:
        toks = generate(cfg, params, PROMPT, N, exit_layer=e).tokens[0]
        full = sj.exit_logits(cfg, params, np.asarray([PROMPT + toks]))[e][0]
        np.testing.assert_array_equal(toks, np.asarray(full[len(PROMPT) - 1:-1]).argmax(-1),
                                      err_msg=f"exit {e}")


@pytest.mark.parametrize("tie", [False, True])
def test_ict_submodel_export_keeps_the_exit_head(tie, tmp_path):
    cfg, params = ict_model(tie)
    ids = np.asarray([PROMPT + [1, 2, 3]])
    ref = sj.exit_logits(cfg, params, ids)
    sub_cfg, sub = submodel(cfg, params, 2)
    assert sub_cfg.num_layers == 2 and not sub_cfg.tie_word_embeddings
    np.testing.assert_array_equal(sub["lm_head"]["kernel"], params["exit_heads"]["kernel"][1])
    np.testing.assert_allclose(sj.exit_logits(sub_cfg, sub, ids)[2], ref[2], rtol=1e-5,
                               atol=1e-5)
    # the final layer keeps the shared head (the tied embedding when tied)
    last_cfg, _ = submodel(cfg, params, cfg.num_layers)
    assert last_cfg.tie_word_embeddings == tie
    # the CLI path: checkpoint -> HF folder of exit 2 -> loads back with the same logits
    ckpt = save_params(tmp_path / "ckpt", cfg, params)
    assert convert_main(["to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "e2"),
                         "--exit", "2"]) == 0
    hf_cfg, hf_params = sj.load_hf(tmp_path / "e2")
    assert hf_cfg.num_layers == 2 and "exit_heads" not in hf_params
    np.testing.assert_allclose(sj.exit_logits(hf_cfg, hf_params, ids)[2], ref[2], rtol=1e-5,
                               atol=1e-5)
