"""The chunked multi-exit loss equals the plain one (loss, metrics, gradients) and its memory
does not grow with |exits| x tokens x vocab."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import soft_jax as sj
from soft_jax.train.chunked_loss import default_chunk_tokens
from soft_jax.train.loss import (chunked_exit_loss_from_hidden, exit_loss_from_hidden, loss_fn,
                           resolve_loss_impl)

BASE = sj.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4,
                      num_heads=4, num_kv_heads=2, exits=(1, 2, 3))


def _params(cfg, seed=0):
    """Random parameters with init_params' structure, built in numpy (no init compile)."""
    shapes = jax.eval_shape(lambda: sj.init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)
    out = jax.tree.map(lambda s: jnp.asarray(
        0.1 * rng.standard_normal(s.shape).astype(np.float32), s.dtype), shapes)
    scale = 1.0 + 0.2 * rng.standard_normal(cfg.hidden_size).astype(np.float32)
    out["final_norm"]["scale"] = jnp.asarray(scale, cfg.weight_dtype)
    return out


def _head_params(params):
    return {k: v for k, v in params.items() if k != "layers"}


def _inputs(cfg, b=3, t=10, seed=1, zero_row=True):
    rng = np.random.default_rng(seed)
    e = len(cfg.resolved_exits)
    hidden = jnp.asarray(rng.standard_normal((e, b, t, cfg.hidden_size)).astype(np.float32),
                         cfg.compute_dtype)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    mask = rng.random((b, t)) > 0.3
    if zero_row:
        mask[1] = False  # a row with no counted tokens
    return hidden, targets, jnp.asarray(mask)


def _three(cfg, params, hidden, targets, mask, z_loss, chunk, modes=(False, True)):
    """value_and_grad of the plain, fused-chunked and recompute-chunked losses (one compile)."""
    exits = cfg.resolved_exits

    def run(p, h):
        plain = lambda p, h: exit_loss_from_hidden(cfg, p, h, targets, mask, exits, z_loss)  # noqa
        out = [jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(p, h)]
        for recompute in modes:
            f = lambda p, h, r=recompute: chunked_exit_loss_from_hidden(  # noqa: E731
                cfg, p, h, targets, mask, exits, z_loss, chunk, recompute=r)
            out.append(jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, h))
        return out

    return jax.jit(run)(params, hidden)


def _assert_close(ref, got, rtol, atol):
    (l_ref, m_ref), g_ref = ref
    (l_got, m_got), g_got = got
    np.testing.assert_allclose(l_got, l_ref, rtol=rtol, atol=atol)
    assert set(m_got) == set(m_ref)
    for k in m_ref:
        np.testing.assert_allclose(m_got[k], m_ref[k], rtol=rtol, atol=atol, err_msg=k)
    flat_ref = jax.tree_util.tree_flatten_with_path(g_ref)[0]
    flat_got = jax.tree.leaves(g_got)
    assert len(flat_ref) == len(flat_got)
    for (path, a), b in zip(flat_ref, flat_got):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol * max(np.abs(a).max(), 1e-30),
                                   err_msg=jax.tree_util.keystr(path))


CASES = {
    # name: (config changes, z_loss, chunk_tokens)
    "untied_uneven_chunks": ({}, 0.0, 12),  # 3 x 4 positions over T = 10
    "tied_embeddings_one_chunk": ({"tie_word_embeddings": True}, 1e-3, 1000),
    "ict_exit_heads": ({"num_exit_heads": 3}, 0.0, 12),
    "z_loss_weighted_exits": ({"exit_weights": (1.0, 2.0, 5.0, 0.5)}, 1e-2, 9),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_equals_plain_loss_and_grads(case):
    """Fused and recompute modes vs plain: loss, every metric, every gradient (float32)."""
    changes, z_loss, chunk = CASES[case]
    cfg = BASE.replace(**changes)
    params = _head_params(_params(cfg))
    hidden, targets, mask = _inputs(cfg)
    ref, fused, recompute = _three(cfg, params, hidden, targets, mask, z_loss, chunk)
    for got in (fused, recompute):
        _assert_close(ref, got, rtol=1e-5, atol=1e-6)
    grads = fused[1][0]
    head = grads["embed"]["embedding"] if cfg.tie_word_embeddings else grads["lm_head"]["kernel"]
    for g in (fused[1][1], grads["final_norm"]["scale"], head):
        assert float(jnp.abs(g).max()) > 0  # the gradient really flows there
    if cfg.num_exit_heads:
        assert bool((jnp.abs(grads["exit_heads"]["kernel"]).max(axis=(1, 2)) > 0).all())


def test_exit_subset_of_ict_config_reads_the_right_heads():
    cfg = BASE.replace(num_exit_heads=3)
    params = _head_params(_params(cfg))
    hidden, targets, mask = _inputs(cfg)
    exits = (2, 4)  # exit 2 -> exit head row 1, exit 4 -> shared head
    h = hidden[jnp.array([1, 3])]
    ref, got = jax.jit(lambda p, h: (
        exit_loss_from_hidden(cfg, p, h, targets, mask, exits),
        chunked_exit_loss_from_hidden(cfg, p, h, targets, mask, exits, chunk_tokens=4)))(params, h)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(got[1]["loss/exit_2"], ref[1]["loss/exit_2"], rtol=1e-5)


def test_bfloat16_compute_is_close():
    cfg = BASE.replace(dtype="bfloat16")
    params = _head_params(_params(cfg))
    hidden, targets, mask = _inputs(cfg)
    ref, got = _three(cfg, params, hidden, targets, mask, 1e-3, 7, modes=(False,))
    (l_ref, _), g_ref = ref
    (l_got, _), g_got = got
    assert got[1][1].dtype == jnp.bfloat16 and got[1][0]["lm_head"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(l_got, l_ref, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_got)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(b - a).max() <= 0.03 * np.abs(a).max()


def test_per_exit_sums_are_differentiable_in_recompute_mode():
    cfg = BASE
    params = _head_params(_params(cfg))
    hidden, targets, mask = _inputs(cfg)
    exits = cfg.resolved_exits

    def one_exit(impl_fn, **kw):
        return jax.grad(lambda h: impl_fn(cfg, params, h, targets, mask, exits, **kw)[1][
            "loss/exit_2"])(hidden)

    ref, got = jax.jit(lambda: (one_exit(exit_loss_from_hidden), one_exit(
        chunked_exit_loss_from_hidden, chunk_tokens=5, recompute=True)))()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(got[0]).max()) == 0.0 and float(jnp.abs(got[1]).max()) > 0


def test_auto_selection_rule_and_default_chunk():
    assert resolve_loss_impl("auto", 3, 30, None) == "plain"
    assert resolve_loss_impl("auto", 8, 512, 1024) == "chunked"
    assert resolve_loss_impl("auto", 1, 2048, 1024) == "plain"
    assert resolve_loss_impl("auto", 1, 4096, 1024) == "chunked"
    assert default_chunk_tokens(32000, "gpu") == 4096
    assert default_chunk_tokens(128256, "gpu") == 1024
    assert default_chunk_tokens(32000, "cpu") == 256
    assert default_chunk_tokens(10 ** 7, "cpu") == 128
    assert resolve_loss_impl("plain", 8, 10 ** 6, None) == "plain"
    with pytest.raises(ValueError, match="loss impl"):
        resolve_loss_impl("fast", 1, 1, None)


def test_full_step_chunked_equals_plain_and_memory_does_not_scale_with_exits():
    """loss_fn through the whole stack, jitted value_and_grad: the chunked loss gives the
    plain loss and gradients; XLA's temp bytes of the step: 8 chunked exits ~ 1 chunked exit,
    while the plain loss keeps all 8 exits' [256, 4096] float32 logits (4 MiB each)."""
    cfg = sj.LlamaConfig(vocab_size=4096, hidden_size=16, intermediate_size=16, num_layers=8,
                         num_heads=1, num_kv_heads=1)
    params = _params(cfg, seed=3)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, cfg.vocab_size, (2, 128))
    batch = {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(np.roll(ids, -1, 1)),
             "loss_mask": jnp.asarray(rng.random((2, 128)) > 0.2)}
    all_exits = tuple(range(1, 9))

    def compiled(exits, impl):
        step = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(
            cfg, p, b, exits, 1e-3, impl=impl, chunk_tokens=48), has_aux=True))
        return step.lower(params, batch).compile()

    plain_8, chunk_8 = compiled(all_exits, "plain"), compiled(all_exits, "chunked")
    chunk_1 = compiled((8,), "chunked")
    temp = lambda c: c.memory_analysis().temp_size_in_bytes  # noqa: E731
    logits_bytes = 2 * 128 * 4096 * 4
    assert temp(plain_8) > 8 * logits_bytes, temp(plain_8)
    assert temp(chunk_8) / temp(chunk_1) < 1.2, (temp(chunk_8), temp(chunk_1))
    assert temp(chunk_8) < temp(plain_8) / 5, (temp(chunk_8), temp(plain_8))

    ((lp, mp), gp), ((lc, mc), gc) = plain_8(params, batch), chunk_8(params, batch)
    np.testing.assert_allclose(lc, lp, rtol=1e-5)
    for e in all_exits:
        np.testing.assert_allclose(mc[f"loss/exit_{e}"], mp[f"loss/exit_{e}"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gc)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def test_weights_override_is_differentiable_in_every_impl():
    """SortedNet passes a traced one-hot: every impl must give exit e's loss and its gradient."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import soft_jax as sj
    from soft_jax.train.loss import loss_fn

    cfg = sj.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_layers=3,
                         num_heads=2, num_kv_heads=1, exits=(1, 2))
    params = sj.init_params(cfg, jax.random.PRNGKey(0))
    ids = np.random.default_rng(0).integers(0, 61, (2, 8))
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1)}
    onehot = jnp.array([0.0, 1.0, 0.0])
    ref = jax.grad(lambda p: loss_fn(cfg, p, batch, impl="plain")[1]["loss/exit_2"])(params)
    for impl in ("plain", "chunked", "chunked_recompute"):
        f = lambda p: loss_fn(cfg, p, batch, impl=impl, chunk_tokens=4, weights=onehot)  # noqa
        (loss, m), g = jax.value_and_grad(f, has_aux=True)(params)
        np.testing.assert_allclose(loss, m["loss/exit_2"], rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, ref)
