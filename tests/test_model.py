"""Model internals: scanned vs unscanned stacks, remat policies, masks, exits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import REASSOC

import soft_jax as sj
from soft_jax.model.config import REMAT_POLICIES
from soft_jax.train.loss import loss_fn
from soft_jax.model.transformer import attention_mask, exit_hidden_states

CFG = sj.LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=80, num_layers=6,
                     num_heads=4, num_kv_heads=2, exits=(1, 4))


def _batch(cfg, b=2, t=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (b, t))
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones((b, t))}


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_scanned_and_unscanned_agree_on_losses_and_grads(policy):
    # 3 layers (exits 1, 2, 3) keep each of the 12 compiles short
    cfg = CFG.replace(num_layers=3, exits=(1, 2), remat_policy=policy)
    params = sj.init_params(cfg, jax.random.PRNGKey(1))
    batch = _batch(cfg)
    out = {}
    for scan in (True, False):
        c = cfg.replace(scan_layers=scan)
        f = jax.value_and_grad(lambda p, c=c: loss_fn(c, p, batch), has_aux=True)
        (_, metrics), grads = jax.jit(f)(params)
        out[scan] = ({e: metrics[f"loss/exit_{e}"] for e in (1, 2, 3)}, grads)
    for e in (1, 2, 3):  # the same maths in another order: float32 reassociation
        np.testing.assert_allclose(out[True][0][e], out[False][0][e], rtol=REASSOC)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=0, atol=REASSOC * float(np.abs(b).max())), out[True][1], out[False][1])


def test_scanned_and_unscanned_agree_on_logits():
    cfg = CFG.replace(num_layers=3, exits=(1, 2))
    params = sj.init_params(cfg, jax.random.PRNGKey(1))
    ids = _batch(cfg)["input_ids"]
    logits = {scan: sj.exit_logits(cfg.replace(scan_layers=scan), params, ids)
              for scan in (True, False)}
    for e in (1, 2, 3):
        np.testing.assert_allclose(logits[True][e], logits[False][e], rtol=1e-5, atol=1e-5)


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


def test_remat_tables_name_real_activations():
    # every tag a policy saves is a checkpoint_name of the layer, and every tag is saved by one
    from soft_jax.model.config import REMAT_SAVES
    from soft_jax.model.layers import DecoderLayer, rope_tables

    tags = set()
    for cfg in (CFG, CFG.replace(qk_norm=True, qkv_bias=True)):  # every option's tags
        params = sj.init_params(cfg, jax.random.PRNGKey(0))["layers"]
        layer0 = jax.tree.map(lambda p: p[0], params)
        h = jnp.zeros((1, 4, cfg.hidden_size))
        cos, sin = rope_tables(cfg, jnp.zeros((1, 4), jnp.int32))
        jaxpr = jax.make_jaxpr(
            lambda p, c=cfg: DecoderLayer(c).apply({"params": p}, h, cos, sin)[0])(layer0)
        tags |= {e.params["name"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "name"}
    saved = {t for names in REMAT_SAVES.values() if names for t in names}
    assert saved == tags, (saved, tags)
    # the old alias is gone: it is refused by name like any unknown policy
    with pytest.raises(ValueError, match="remat_policy='save_mlp_out'"):
        CFG.replace(remat_policy="save_mlp_out")
