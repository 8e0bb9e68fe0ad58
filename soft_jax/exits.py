"""Exits and heads: which layer counts a model is read at, and which kernel serves each exit.

An exit is a 1-based layer count. Every exit is read through the final norm and a head: the
shared head (`lm_head`, or the embedding table when tied), or, in an ICT model, its own exit
head. The head table stacks the ICT exit heads (one per non-final exit of the config, in
order) and then the shared head, so `head_index` is the one place that decides which kernel
serves an exit; the model, the chunked loss, the decoders, the exporter and eval all ask it.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # config imports this module
    from soft_jax.config import LlamaConfig

Array = jax.Array


# ------------------------------------------------------------------------------ layer counts
def layer_count(value, num_layers: int, name: str = "exit", *, not_last: str | None = None,
                error: type[Exception] = ValueError) -> int:
    """`value` as an int in 1..num_layers (1..num_layers-1 when `not_last` gives the reason
    the last layer is excluded), else `error` naming `name` and the expected range."""
    try:
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    hi = num_layers - 1 if not_last else num_layers
    if v is None or not 1 <= v <= hi:
        why = f"; {not_last}" if not_last and v == num_layers else ""
        raise error(f"{name} {value!r} is not a layer count of this {num_layers}-layer model "
                    f"(expected 1..{hi}{why})")
    return v


def normalize_exits(exits, num_layers: int) -> tuple[int, ...]:
    """Validate 1-based exit layer counts, sort them and make sure the last layer is included."""
    if exits is None:
        return (num_layers,)
    if isinstance(exits, int):
        exits = (exits,)
    return tuple(sorted({layer_count(e, num_layers) for e in exits} | {num_layers}))


def with_last(config: LlamaConfig, exits=None) -> tuple[int, ...]:
    """The exits to compute: `exits` (None: the config's), checked, sorted, with the last one."""
    return normalize_exits(exits if exits is not None else config.exits, config.num_layers)


def pair_exit_weights(exits, weights, num_layers: int, exits_name: str = "exits",
                      weights_name: str = "exit_weights"
                      ) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """(sorted exits with the last layer, their weights): weight i belongs to exit i as
    written; when the last layer is not written, a trailing extra weight may give its own
    (else the lengths must match exactly)."""
    if weights is None:
        return normalize_exits(exits, num_layers), None
    written = [num_layers] if exits is None else [exits] if isinstance(exits, int) else list(
        exits)
    resolved = normalize_exits(written, num_layers)
    if len(set(int(e) for e in written)) != len(written):
        raise ValueError(f"{exits_name}={tuple(written)} repeats an exit, so {weights_name} "
                         "cannot be paired with it")
    if num_layers not in written and len(weights) == len(written) + 1:
        written.append(num_layers)
    if len(weights) != len(written):
        raise ValueError(
            f"{weights_name} has {len(weights)} entries but {exits_name}={tuple(written)} has "
            f"{len(written)} (one weight per exit as written; the last layer {num_layers} is "
            f"added to the exits unless listed, and then needs its own weight)")
    pairs = dict(zip((int(e) for e in written), (float(w) for w in weights)))
    if set(pairs) != set(resolved):
        raise ValueError(f"{weights_name} gives no weight for the last layer {num_layers}: add "
                         f"it to {exits_name} with a weight")
    return resolved, tuple(pairs[e] for e in resolved)


# ------------------------------------------------------------------------------ heads
def exit_head_count(params: dict) -> int:
    """Number of ICT exit heads in `params` (0: every exit reads the shared head)."""
    return params["exit_heads"]["kernel"].shape[0] if "exit_heads" in params else 0


def head_index(config: LlamaConfig, params: dict, exit_layer: int) -> int:
    """Row of the head serving `exit_layer` in the head table: its ICT exit head (its index
    among the config's exits), else the shared head after them (row `exit_head_count`)."""
    shared = exit_head_count(params)
    if not shared or exit_layer == config.num_layers:
        return shared
    if exit_layer not in config.resolved_exits:
        raise ValueError(f"exit {exit_layer} has no head in this ICT model; its exits are "
                         f"{list(config.resolved_exits)}")
    return config.resolved_exits.index(exit_layer)


def uses_shared_head(config: LlamaConfig, params: dict, exit_layer: int) -> bool:
    """Whether `exit_layer` is read through the shared head (lm_head or tied embedding)."""
    return head_index(config, params, exit_layer) == exit_head_count(params)


def shared_kernel(config: LlamaConfig, params: dict) -> Array:
    """The shared [hidden, vocab] head: `lm_head`, or the embedding table transposed if tied."""
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def head_kernel(config: LlamaConfig, params: dict, exit_layer: int) -> Array:
    """The [hidden, vocab] head read at `exit_layer`: the shared head, or an ICT exit head."""
    if uses_shared_head(config, params, exit_layer):
        return shared_kernel(config, params)
    return params["exit_heads"]["kernel"][head_index(config, params, exit_layer)]


def head_table(config: LlamaConfig, params: dict,
               exits: tuple[int, ...]) -> tuple[Array, tuple[int, ...]]:
    """The head kernels as a [K, D, V] table and, per exit, its row.

    When every exit reads the shared head (untied or tied: embedding.T, so gradients reach
    the embedding): K = 1. Otherwise the K-1 ICT exit heads then the shared head (a copy of
    the ICT heads per call).
    """
    rows = tuple(head_index(config, params, e) for e in exits)
    shared = shared_kernel(config, params)[None]
    if all(r == exit_head_count(params) for r in rows):
        return shared, (0,) * len(exits)
    return jnp.concatenate([params["exit_heads"]["kernel"], shared], axis=0), rows


def check_heads(config: LlamaConfig, params: dict, exits, field: str) -> None:
    """ValueError naming `field` unless every exit has a head (an ICT model: only its exits)."""
    if exit_head_count(params):
        bad = [e for e in exits if e not in config.resolved_exits]
        if bad:
            raise ValueError(f"{field}: {bad} have no head in this ICT model; its exits are "
                             f"{list(config.resolved_exits)}")


def initial_exit_heads(config: LlamaConfig, params: dict) -> dict:
    """ICT exit heads for `params` that has none: one copy of the shared head per non-final
    exit of the config."""
    shared = shared_kernel(config, params)
    return {"kernel": jnp.stack([shared] * (len(config.resolved_exits) - 1))}
