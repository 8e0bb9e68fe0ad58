"""The train state, the settings the step reads, and the jitted train step.

`TrainState` is a pytree (step, params, opt_state); checkpoints store its `params` and
`opt_state` as separate items (soft_jax/checkpoint.py), so their tree layout is the params'
and optax's own. `StepSettings` is the typed, hashable part of the run config that the jitted
closure reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from soft_jax.parallel import sharding as shd
from soft_jax.train.chunked_loss import default_chunk_tokens
from soft_jax.model.config import LlamaConfig
from soft_jax.train.loss import loss_fn
from soft_jax.model.transformer import init_params
from soft_jax.train.modes import train_exits
from soft_jax.train.recipes import Recipe, layer_keep, step_weights


@struct.dataclass
class TrainState:
    """What one step reads and donates: the step count, all params and the optimizer state
    of the trainable param groups."""

    step: Any  # int32 scalar
    params: dict
    opt_state: Any

    def split(self, keys: tuple[str, ...]) -> tuple[dict, dict]:
        """(trainable, frozen) top-level param groups; `keys` names the trainable ones."""
        return ({k: self.params[k] for k in keys},
                {k: v for k, v in self.params.items() if k not in keys})


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The run-config fields the jitted step depends on (static: a change recompiles)."""

    mode: str = "soft"
    seed: int = 0
    grad_accum: int = 1
    z_loss: float = 0.0
    loss_impl: str = "auto"
    chunk_tokens: int | None = None  # None: the backend's default chunk
    recipe: Recipe = Recipe()
    backend: str | None = None  # whose defaults apply (None: jax's default backend)

    @classmethod
    def from_config(cls, cfg, backend: str | None = None) -> "StepSettings":
        """The step settings of a training config (soft_jax/train/run_config.py), for `backend`
        (default: the one this process runs on)."""
        return cls(mode=str(cfg.mode), seed=int(cfg.seed), grad_accum=int(cfg.grad_accum),
                   z_loss=float(cfg.loss.z_loss), loss_impl=str(cfg.loss.impl),
                   chunk_tokens=int(cfg.loss.chunk_tokens) or None,
                   recipe=Recipe.from_config(cfg.loss), backend=backend)


class Partitioning(NamedTuple):
    """How a run is laid out on its mesh: state and batch shardings, activation rules."""

    mesh: jax.sharding.Mesh
    rules: tuple
    state: TrainState  # of NamedSharding trees
    batch: jax.sharding.NamedSharding  # every [batch, seq] input

    @property
    def replicated(self):
        return shd.replicated(self.mesh)


def abstract_state(config: LlamaConfig, tx, keys: tuple[str, ...], params=None) -> TrainState:
    """ShapeDtypeStructs of the train state (no device memory touched)."""
    if params is None:
        params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    opt = jax.eval_shape(tx.init, {k: params[k] for k in keys})
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt)


def make_partitioning(mesh, rules, state_abstract: TrainState, batch_size: int,
                      seq_len: int, axes) -> Partitioning:
    """Shardings from the params' logical `axes` (`param_axes(config)`) and the rules: params
    and optimizer moments alike (FSDP over `fsdp`, tensor parallel over `tensor`, replicated
    over `data`), scalars replicated."""
    state = TrainState(shd.replicated(mesh),
                       shd.tree_shardings(state_abstract.params, axes, mesh, rules),
                       shd.tree_shardings(state_abstract.opt_state, axes, mesh, rules))
    return Partitioning(mesh, tuple(rules), state,
                        shd.batch_sharding(mesh, batch_size, seq_len, rules))


def sharded_target(abstract: TrainState, part: Partitioning) -> TrainState:
    """The abstract state with this mesh's shardings attached (a checkpoint restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, part.state)


def make_train_step(config: LlamaConfig, settings: StepSettings, tx, schedule,
                    keys: tuple[str, ...], partitioning: Partitioning | None = None):
    """The jitted step(state, batch) -> (state, metrics); state is donated.

    With `partitioning`, the step is
    jitted with its state / batch in- and out-shardings and traced under the activation
    rules (the residual stream is pinned to batch x data/fsdp); without, it is a plain
    single-device jit.
    """
    s = settings
    exits = train_exits(config, s.mode)
    accum = s.grad_accum
    chunk = s.chunk_tokens or (default_chunk_tokens(config.vocab_size, s.backend)
                               if s.backend else None)

    def loss_of(trainable, frozen, batch, rng, step):
        weights = step_weights(s.recipe, exits, step) if len(exits) > 1 else None
        if s.mode == "sortednet":  # one sub-model per step, drawn uniformly
            idx = jax.random.randint(rng, (), 0, len(exits))
            weights = jax.nn.one_hot(idx, len(exits))
        keep = layer_keep(s.recipe, rng, config.num_layers, batch["input_ids"].shape[0])
        loss, metrics = loss_fn(config, {**frozen, **trainable}, batch, exits, z_loss=s.z_loss,
                                impl=s.loss_impl, chunk_tokens=chunk, weights=weights,
                                distill=s.recipe.distill if len(exits) > 1 else 0.0,
                                keep=keep)
        if s.mode == "sortednet":
            metrics = {**metrics, "sampled_exit": jnp.asarray(exits)[idx]}
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def accumulated(trainable, frozen, batch, rng, step):
        """Mean gradients and metrics over `accum` micro-batches (a scan: one compiled body)."""
        micro = jax.tree.map(lambda x: shd.constrain(
            x.reshape((accum, -1) + x.shape[1:]), (None,) + shd.BATCH_AXES), batch)

        def one(acc, mb):
            (_, m), g = grad_fn(trainable, frozen, mb, rng, step)
            return jax.tree.map(jnp.add, acc, (g, m)), None

        shapes = jax.eval_shape(lambda: grad_fn(trainable, frozen,
                                                jax.tree.map(lambda x: x[0], micro), rng,
                                                step))
        init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (shapes[1], shapes[0][1]))
        (grads, metrics), _ = jax.lax.scan(one, init, micro)
        return jax.tree.map(lambda x: x / accum, (grads, metrics))

    def step(state: TrainState, batch):
        trainable, frozen = state.split(keys)
        rng = jax.random.fold_in(jax.random.PRNGKey(s.seed), state.step)
        if accum == 1:
            (_, metrics), grads = grad_fn(trainable, frozen, batch, rng, state.step)
        else:
            grads, metrics = accumulated(trainable, frozen, batch, rng, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, {**frozen, **trainable}, opt_state), metrics

    if partitioning is None:
        return jax.jit(step, donate_argnums=0)
    mesh, rules = partitioning.mesh, partitioning.rules

    def sharded_step(state, batch):
        with shd.activation_rules(mesh, rules):
            return step(state, batch)

    return jax.jit(sharded_step, donate_argnums=0,
                   in_shardings=(partitioning.state, partitioning.batch),
                   out_shardings=(partitioning.state, partitioning.replicated))
