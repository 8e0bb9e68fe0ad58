"""Exits and heads: which layer counts a model is read at, and which kernel serves each exit.

An exit is a 1-based layer count. Every exit is read through the final norm and a head: the
shared head (`lm_head`, or the embedding table when tied), or, in an ICT model, its own exit
head. The head table stacks the ICT exit heads (one per non-final exit of the config, in
order) and then the shared head, so `head_index` is the one place that decides which kernel
serves an exit; the model, the chunked loss, the decoders, the exporter and eval all ask it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from soft_jax.model.config import LlamaConfig
from soft_jax.model.layer_counts import normalize_exits

Array = jax.Array


def with_last(config: LlamaConfig, exits=None) -> tuple[int, ...]:
    """The exits to compute: `exits` (None: the config's), checked, sorted, with the last one."""
    return normalize_exits(exits if exits is not None else config.exits, config.num_layers)


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
