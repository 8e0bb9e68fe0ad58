"""Exit-loss recipes against plain reference implementations: weights, self-distillation
(plain, fused-chunked and recompute-chunked agree with a numpy KL), LayerSkip's layer dropout
and curriculum, and the default leaving the paper's loss untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from soft_jax.train.loss import chunked_exit_loss_from_hidden, exit_loss_from_hidden, loss_fn
from soft_jax.train.recipes import (Recipe, dropout_rates, layer_keep, static_weights,
                                    step_weights)
from soft_jax.train.run_config import default_config, validate
from soft_jax.train.step import StepSettings, TrainState, make_train_step
from soft_jax.model.transformer import exit_hidden_states, head_logits
from test_chunked_loss import BASE, _assert_close, _head_params, _inputs, _params

# float32 throughout: the chunked forms only reassociate sums of the same float32 terms
RTOL, ATOL = 1e-5, 1e-6


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_distill_chunked_equals_plain_and_a_numpy_reference():
    cfg = BASE
    params = _head_params(_params(cfg))
    hidden, targets, mask = _inputs(cfg)
    exits, alpha = cfg.resolved_exits, 0.7

    def run(p, h):
        plain = lambda p, h: exit_loss_from_hidden(cfg, p, h, targets, mask, exits,  # noqa
                                                   distill=alpha)
        out = [jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(p, h)]
        for r in (False, True):
            f = lambda p, h, r=r: chunked_exit_loss_from_hidden(  # noqa: E731
                cfg, p, h, targets, mask, exits, chunk_tokens=12, recompute=r, distill=alpha)
            out.append(jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, h))
        return out

    ref, fused, recompute = jax.jit(run)(params, hidden)
    for got in (fused, recompute):
        _assert_close(ref, got, rtol=RTOL, atol=ATOL)
    # numpy: mean over exits of CE + alpha * KL(p_last || p_e), token means over the mask
    m = np.asarray(mask, bool)
    logp = [_log_softmax(head_logits(cfg, params, hidden[i], e)) for i, e in enumerate(exits)]
    q = np.exp(logp[-1])
    tg = np.asarray(targets)
    ce = [-np.take_along_axis(lp, tg[..., None], -1)[..., 0][m].mean() for lp in logp]
    kl = [(q * (logp[-1] - lp)).sum(-1)[m].mean() for lp in logp]
    np.testing.assert_allclose(ref[0][0], np.mean(ce) + alpha * np.mean(kl), rtol=1e-5)
    for i, e in enumerate(exits[:-1]):
        np.testing.assert_allclose(ref[0][1][f"kl/exit_{e}"], kl[i], rtol=1e-5, atol=1e-6)


def test_distill_teacher_gets_no_gradient_from_the_kl():
    cfg = BASE
    params = _head_params(_params(cfg))
    hidden, targets, mask = _inputs(cfg)
    exits = cfg.resolved_exits
    g = lambda d: jax.grad(lambda h: chunked_exit_loss_from_hidden(  # noqa: E731
        cfg, params, h, targets, mask, exits, chunk_tokens=12, distill=d)[0])(hidden)
    g0, g1 = jax.jit(lambda: (g(0.0), g(1.0)))()
    np.testing.assert_allclose(g1[-1], g0[-1], rtol=RTOL, atol=ATOL)  # last exit: CE only
    assert float(jnp.abs(g1[0] - g0[0]).max()) > 0


@pytest.mark.parametrize("name,expect", [
    ("paper", None),
    ("depth", [1, 2, 3, 4]),
    ("last_boost", [1, 1, 1, 3]),
    ("last_boost_distill", [1, 1, 1, 3]),
    ("layerskip", [1, 3, 6, 10]),
])
def test_recipe_weights(name, expect):
    w = static_weights(Recipe(name), (1, 2, 3, 4))
    assert (w is None) if expect is None else np.allclose(w, expect)


def test_layerskip_curriculum_rotates_exits_and_keeps_the_last():
    r = Recipe("layerskip", curriculum_period=2)
    w0 = np.asarray(step_weights(r, (1, 2, 3, 4), jnp.int32(0)))
    w1 = np.asarray(step_weights(r, (1, 2, 3, 4), jnp.int32(1)))
    np.testing.assert_allclose(w0, [1, 0, 6, 10])
    np.testing.assert_allclose(w1, [0, 3, 0, 10])
    assert step_weights(Recipe("layerskip", curriculum_period=1), (1, 2), 5).tolist() == [1, 3]


def test_weighted_recipe_loss_is_the_weighted_mean_of_exit_losses():
    cfg = BASE
    params = _head_params(_params(cfg))
    hidden, targets, mask = _inputs(cfg)
    exits = cfg.resolved_exits
    w = static_weights(Recipe("depth"), exits)
    loss, metrics = exit_loss_from_hidden(cfg, params, hidden, targets, mask, exits, weights=w)
    per = np.array([metrics[f"loss/exit_{e}"] for e in exits])
    np.testing.assert_allclose(loss, (w / w.sum() * per).sum(), rtol=1e-6)


def test_dropout_rates_rise_with_depth_from_zero_to_the_maximum():
    rates = dropout_rates(Recipe("layerskip", layer_dropout=0.3), 5)
    assert rates[0] == 0 and np.isclose(rates[-1], 0.3) and (np.diff(rates) > 0).all()
    assert not dropout_rates(Recipe("paper"), 5).any()
    assert layer_keep(Recipe("paper"), jax.random.PRNGKey(0), 5, 2) is None


def test_dropped_layer_equals_the_model_without_that_layer():
    cfg = BASE.replace(exits=(2,))
    params = _params(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 6)))
    keep = jnp.ones((4, 2), bool).at[1, 0].set(False)  # layer 2 skipped for sequence 0
    full = exit_hidden_states(cfg, params, ids, exits=(2, 4))
    dropped = exit_hidden_states(cfg, params, ids, exits=(2, 4), keep=keep)
    short = {**params, "layers": jax.tree.map(lambda x: x[jnp.array([0, 2, 3])],
                                              params["layers"])}
    ref = exit_hidden_states(cfg.replace(num_layers=3, exits=()), short, ids, exits=(3,))
    np.testing.assert_allclose(dropped[1, 0], ref[0, 0], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(dropped[:, 1], full[:, 1])  # sequence 1 untouched
    np.testing.assert_array_equal(
        exit_hidden_states(cfg, params, ids, exits=(2, 4), keep=jnp.ones((4, 2), bool)), full)
    unscanned = exit_hidden_states(cfg.replace(scan_layers=False), params, ids, exits=(2, 4),
                                   keep=keep)
    np.testing.assert_allclose(unscanned, dropped, rtol=RTOL, atol=ATOL)


def _step_metrics(cfg, recipe: Recipe, batch, params):
    tx = optax.sgd(0.0)
    settings = StepSettings(mode="soft", recipe=recipe, loss_impl="plain")
    step = make_train_step(cfg, settings, tx, lambda s: 0.0, tuple(sorted(params)))
    state = TrainState(jnp.int32(0), params, tx.init(params))
    return jax.device_get(step(state, batch)[1])


def test_default_recipe_step_is_the_paper_loss_and_recipes_run_in_the_step():
    cfg = BASE
    params = _params(cfg)
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)))
    batch = {"input_ids": ids, "targets": jnp.roll(ids, -1, 1)}
    paper = _step_metrics(cfg, Recipe(), batch, jax.tree.map(jnp.copy, params))
    ref = jax.device_get(loss_fn(cfg, params, batch, impl="plain")[1])
    assert paper["loss"] == ref["loss"]
    skip = _step_metrics(cfg, Recipe("layerskip", layer_dropout=0.5), batch,
                         jax.tree.map(jnp.copy, params))
    distill = _step_metrics(cfg, Recipe("distill"), batch, jax.tree.map(jnp.copy, params))
    assert np.isfinite(skip["loss"]) and "kl/exit_1" in distill
    assert distill["kl/exit_1"] > 0 and distill["loss"] == paper["loss"]  # "loss": CE mean
    boost = _step_metrics(cfg, Recipe("last_boost"), batch, jax.tree.map(jnp.copy, params))
    both = _step_metrics(cfg, Recipe("last_boost_distill"), batch, jax.tree.map(jnp.copy, params))
    assert both["loss"] == boost["loss"] != paper["loss"]  # last_boost's weighted CE
    assert both["kl/exit_1"] == distill["kl/exit_1"]  # and distill's KL term


def test_bad_recipe_fields_are_named():
    c = default_config()
    c.loss.recipe = "fancy"
    with pytest.raises(ValueError, match="config.loss.recipe"):
        validate(c)
    c = default_config()
    c.loss.layer_dropout = 1.5
    with pytest.raises(ValueError, match="config.loss.layer_dropout"):
        validate(c)
