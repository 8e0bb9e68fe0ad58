"""Instance-aware dynamic inference: each token runs the exits in order and stops at the first
whose top-1 probability reaches that exit's threshold (the last layer always answers).

A token that exits at layer j leaves layers j+1..L without its KV. Exact lazy catch-up keeps
its layer-j state; the next token that goes deeper runs the pending states through the missing
layers together with itself, so every KV entry is the one the full model would compute. The
pending tokens always form a contiguous run of slots ending at the current token: after a
token reaches depth d, every earlier token has depth >= d, so depths never increase along the
sequence. `copy_kv=True` is CALM's approximation instead: the exited state is copied upward and
the skipped layers' KV are projected from it at once.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soft_jax.model.config import LlamaConfig
from soft_jax.infer.engine import (Cache, Decoding, cache_length, exit_head, for_decoding,
                             layer_weights, prefill_prompts, run_layers, token_loop, trim)
from soft_jax.model.exits import head_index
from soft_jax.model.layer_counts import layer_count
from soft_jax.model.layers import DecoderLayer, rope_tables
from soft_jax.model.transformer import embed

Array = jax.Array
# The paper's thresholds for LLaMA-2 13B (40 layers); other depths map by relative depth.
PAPER_LAYERS = 40
PAPER_THRESHOLDS = {12: 0.95, 16: 0.95, 20: 0.9, 24: 0.9, 28: 0.8, 32: 0.8, 36: 0.7}


def catchup_chunk() -> int:
    """Rows per catch-up call: on accelerators decode is memory-bound and 4 rows cost about
    as much as 1; on CPU the FLOPs count, so pending rows go one at a time."""
    return 1 if jax.default_backend() == "cpu" else 4


def default_thresholds(config: LlamaConfig) -> dict[int, float]:
    """The paper's thresholds on this model's exits: exit e takes the threshold of the paper
    exit p whose relative depth p/40 is nearest to e/L (ties: the shallower, stricter one)."""
    n = config.num_layers
    def nearest(e: int) -> int:
        return min(PAPER_THRESHOLDS, key=lambda p: (abs(p / PAPER_LAYERS - e / n), p))

    return {e: PAPER_THRESHOLDS[nearest(e)] for e in config.resolved_exits if e < n}


def resolve_thresholds(config: LlamaConfig,
                       thresholds) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(exits ending with L, their thresholds) from None (paper), a float (every config exit),
    a dict {exit: threshold} (exactly those exits) or a sequence aligned with the config's
    non-final exits."""
    n = config.num_layers
    if thresholds is None:
        thresholds = default_thresholds(config)
    elif isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = {e: float(thresholds) for e in config.resolved_exits if e < n}
    elif not isinstance(thresholds, dict):
        early = [e for e in config.resolved_exits if e < n]
        if len(thresholds) != len(early):
            raise ValueError(f"thresholds has {len(thresholds)} values but the model has "
                             f"{len(early)} non-final exits {early}; pass a dict {{exit: value}}")
        thresholds = dict(zip(early, thresholds))
    for e, p in thresholds.items():
        layer_count(e, n, "thresholds key", not_last="the last layer always answers")
        if np.isnan(float(p)):  # above 1 is allowed: that exit never answers
            raise ValueError(f"thresholds: exit {e} has {p}; a threshold is a top-1 probability")
    exits = tuple(sorted(int(e) for e in thresholds))
    return exits + (n,), tuple(float(thresholds[e]) for e in exits) + (0.0,)


class DynState(NamedTuple):
    """Cache plus each slot's residual stream at its current depth and that depth."""

    cache: Cache
    hbuf: Array  # [slots, D]
    depth: Array  # [slots] int32, non-increasing over generated slots
    catchup: Array  # layer passes of earlier tokens done on behalf of later ones


def _catch_up(config, params, st: DynState, a: Array, cur: Array, lo: Array, hi: Array,
              chunk: int) -> DynState:
    """Run slots a..cur (all at depth lo) through layers [lo, hi), `chunk` rows per call.

    Rows past `cur` in the last chunk are scratch: they write slots no real query can see yet
    and that the next tokens overwrite before reading.
    """
    def body(c):
        first, st = c
        rows = jax.lax.dynamic_slice_in_dim(st.hbuf, first, chunk)[None]
        h, cache = run_layers(config, params, rows, st.cache, jnp.zeros((1,), jnp.int32), first,
                              lo, hi)
        hbuf = jax.lax.dynamic_update_slice_in_dim(st.hbuf, h[0], first, 0)
        return first + chunk, st._replace(cache=cache, hbuf=hbuf)

    st = jax.lax.while_loop(lambda c: c[0] <= cur, body, (a, st))[1]
    slots = jnp.arange(st.depth.shape[0])
    depth = jnp.where((slots >= a) & (slots <= cur), hi, st.depth)
    return st._replace(depth=depth, catchup=st.catchup + (cur - a) * (hi - lo))


def _copy_kv(config, params, cache: Cache, h: Array, slot: Array, lo: Array) -> Cache:
    """CALM: KV of layers [lo, L) at `slot` projected from the exited state h [D]."""
    cos, sin = rope_tables(config, slot[None, None])
    layer = DecoderLayer(config)

    def write(c, p):
        kv = layer.apply({"params": p}, h[None, None], cos, sin, method=DecoderLayer.kv)
        return tuple(jax.lax.dynamic_update_slice_in_dim(x, u.astype(x.dtype), slot, 1)
                     for x, u in zip(c, kv))

    return tuple(jax.lax.cond(i >= lo, write, lambda c, p: c, c, p)
                 for i, (c, p) in enumerate(zip(cache, layer_weights(params))))


def _token_step(config, params, st: DynState, tok: Array, cur: Array, exits: tuple[int, ...],
                thr: Array, chunk: int, copy_kv: bool):
    """Feed `tok` at slot `cur` exit by exit until one is confident; (logits, state, aux)."""
    bounds = jnp.asarray((0,) + exits, jnp.int32)
    heads = jnp.asarray([head_index(config, params, e) for e in exits], jnp.int32)
    st = st._replace(hbuf=st.hbuf.at[cur].set(embed(config, params, tok)[0]),
                     depth=st.depth.at[cur].set(0))
    slots = jnp.arange(st.depth.shape[0])

    def body(c):
        i, st, _, _, _ = c
        lo, hi = bounds[i], bounds[i + 1]
        a = jnp.argmax((slots <= cur) & (st.depth < hi))  # first pending slot (contiguous run)
        st = _catch_up(config, params, st, a, cur, lo, hi, chunk)
        logits = exit_head(config, params, st.hbuf[cur][None], heads[i])
        conf = jnp.max(jax.nn.softmax(logits[0]))
        return i + 1, st, logits, conf, (conf >= thr[i]) | (i == len(exits) - 1)

    init = (jnp.int32(0), st, jnp.zeros((1, config.vocab_size), jnp.float32), jnp.float32(0),
            jnp.bool_(False))
    i, st, logits, conf, _ = jax.lax.while_loop(lambda c: ~c[-1], body, init)
    if copy_kv:
        st = jax.lax.cond(i < len(exits), lambda st: st._replace(
            cache=_copy_kv(config, params, st.cache, st.hbuf[cur], cur, bounds[i]),
            depth=st.depth.at[cur].set(config.num_layers)), lambda st: st, st)
    return logits, st, (i - 1, conf)


@partial(jax.jit, static_argnames=("config", "exits", "chunk", "copy_kv"))
def dynamic_loop(config: LlamaConfig, params: dict, cache: Cache, last: Array, cur: Array,
                 exits: tuple[int, ...], thr: Array, chunk: int, copy_kv: bool, s: Decoding):
    """Dynamic-exit decoding of one prompt whose tokens before `last` fill slots [0, cur).

    Returns tokens [1, s.capacity], steps, catch-up layer passes, and per token the exit index
    and its top-1 probability.
    """
    slots = cache_length(cache)
    st = DynState(cache, jnp.zeros((slots, config.hidden_size), config.compute_dtype),
                  jnp.where(jnp.arange(slots) < cur, config.num_layers, 0).astype(jnp.int32),
                  jnp.int32(0))

    def step(st, tok, i):
        return _token_step(config, params, st, tok, cur + i, exits, thr, chunk, copy_kv)

    out, steps, st, (idx, confs) = token_loop(step, st, last[None], (jnp.int32(0), jnp.float32(0)),
                                              s)
    return out, steps, st.catchup, idx, confs


def dynamic_generate(config: LlamaConfig, params: dict, prompt: list[int], thresholds,
                     s: Decoding, copy_kv: bool = False,
                     chunk: int | None = None) -> tuple[list[int], dict]:
    """Generate for one prompt with per-token early exit; returns (tokens, stats)."""
    exits, thr = resolve_thresholds(config, thresholds)
    chunk = chunk or catchup_chunk()
    params = for_decoding(params)
    cache, last, _, cur = prefill_prompts(config, params, [prompt], s.max_new + chunk)
    out, steps, catchup, idx, confs = dynamic_loop(
        config, params, cache, last[0], cur, exits, jnp.asarray(thr, jnp.float32), chunk,
        copy_kv, s)
    tokens = trim(np.asarray(out[0]), s.stop_ids)
    n = len(tokens)
    taken = [exits[i] for i in np.asarray(idx)[:n]]
    mean_exit = float(np.mean(taken)) if taken else 0.0
    stats = {"exits": taken, "exit_confidences": [float(c) for c in np.asarray(confs)[:n]],
             "mean_exit_layer": mean_exit, "layer_skip_rate": 1.0 - mean_exit / config.num_layers,
             "catchup_layer_passes": int(catchup), "thresholds": dict(zip(exits[:-1], thr[:-1])),
             "kv": "calm-copy" if copy_kv else "lazy-catch-up"}
    return tokens, stats
