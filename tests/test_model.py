"""Model internals: scanned vs unscanned stacks, remat policies, masks, exits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import soft_jax as sj
from soft_jax.loss import loss_fn
from soft_jax.model import attention_mask, exit_hidden_states

CFG = sj.LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=80, num_layers=6,
                     num_heads=4, num_kv_heads=2, exits=(1, 4))


def _batch(cfg, b=2, t=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (b, t))
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones((b, t))}


@pytest.mark.parametrize("policy", ["none", "full", "save_dots", "save_qkv_out"])
def test_scanned_and_unscanned_agree_on_logits_and_grads(policy):
    cfg = CFG.replace(remat_policy=policy)
    params = sj.init_params(cfg, jax.random.PRNGKey(1))
    batch = _batch(cfg)
    grads = {}
    for scan in (True, False):
        c = cfg.replace(scan_layers=scan)
        logits = sj.exit_logits(c, params, batch["input_ids"])
        g = jax.jit(jax.grad(lambda p: loss_fn(c, p, batch)[0]))(params)
        grads[scan] = (logits, g)
    for e in (1, 4, 6):
        np.testing.assert_allclose(grads[True][0][e], grads[False][0][e], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads[True][1], grads[False][1])


def test_exit_hidden_states_are_the_layer_outputs():
    params = sj.init_params(CFG, jax.random.PRNGKey(2))
    ids = _batch(CFG)["input_ids"]
    every = exit_hidden_states(CFG, params, ids, exits=tuple(range(1, 7)))
    some = exit_hidden_states(CFG, params, ids, exits=(2, 5, 6))
    assert some.shape == (3, 2, 12, CFG.hidden_size)
    np.testing.assert_allclose(some, every[jnp.array([1, 4, 5])], rtol=1e-6, atol=1e-6)


def test_packed_segments_do_not_attend_to_each_other():
    params = sj.init_params(CFG, jax.random.PRNGKey(3))
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 67, (1, 5)), rng.integers(0, 67, (1, 7))
    packed = np.concatenate([a, b], 1)
    seg = np.array([[1] * 5 + [2] * 7])
    pos = np.array([list(range(5)) + list(range(7))])
    h = exit_hidden_states(CFG, params, packed, jnp.asarray(pos), jnp.asarray(seg))
    ha = exit_hidden_states(CFG, params, a)
    hb = exit_hidden_states(CFG, params, b)
    np.testing.assert_allclose(h[:, :, :5], ha, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h[:, :, 5:], hb, rtol=1e-5, atol=1e-5)
    m = attention_mask(jnp.asarray(seg))
    assert m.shape == (1, 1, 12, 12) and not bool(m[0, 0, 6, 4]) and bool(m[0, 0, 6, 5])


def test_bfloat16_compute_is_close_to_float32():
    params = sj.init_params(CFG, jax.random.PRNGKey(5))
    ids = _batch(CFG)["input_ids"]
    ref = sj.exit_logits(CFG, params, ids)
    bf = sj.exit_logits(CFG.replace(dtype="bfloat16"), params, ids)
    for e in ref:
        assert bf[e].dtype == jnp.float32
        assert float(jnp.abs(bf[e] - ref[e]).max()) < 0.05


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        CFG.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="not a layer count"):
        CFG.replace(exits=(0, 3))
    with pytest.raises(ValueError, match="remat_policy"):
        CFG.replace(remat_policy="bogus")
    with pytest.raises(ValueError, match="unknown LlamaConfig field"):
        sj.LlamaConfig.from_dict({"hidden_sise": 3})
    assert CFG.resolved_exits == (1, 4, 6)
    assert sj.LlamaConfig.from_dict(CFG.to_dict()) == CFG
