"""Decoding engine: a preallocated KV cache, a runner for any contiguous range of layers, jitted
prefill and decode loop, and token selection (greedy, temperature, top-k, top-p).

Cache layout: (k, v), each [layers, batch, slots, kv_heads, head_dim]. Prompts are left-padded
so every row writes the same slot each step; row b's real tokens start at slot `pad[b]` and its
RoPE position is `slot - pad[b]`. A key is visible to a query when it is at or before the
query's slot and is a real token, so entries beyond the current length (stale drafts, garbage
rows) are never read: rolling back a cache is just moving the write slot back.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from soft_jax.config import LlamaConfig
from soft_jax.exits import exit_head_count
from soft_jax.layers import DecoderLayer, rope_tables
from soft_jax.model import embed, head_logits

Array = jax.Array
Cache = tuple[Array, Array]
SLOT_ROUNDING = 64  # cache lengths are rounded up so nearby prompt lengths share compilations


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decoding:
    """How tokens are chosen and when a row stops: at most `max_new` tokens, greedy (temperature
    0) or sampled with temperature, top_k (0 = off), top_p and seed; `stop_ids` end a row.

    A pytree for jit: the numbers are traced (new values reuse the compilation); `greedy` and
    `capacity` (the output length, max_new rounded up to SLOT_ROUNDING) are static. Both are
    derived on the host when left None.
    """

    max_new: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int = 0
    greedy: bool | None = dataclasses.field(default=None, metadata=dict(static=True))
    capacity: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        # Only on the host: unflattening inside jit passes both static fields.
        if self.greedy is None:
            object.__setattr__(self, "greedy", self.temperature == 0)
        if self.capacity is None:
            object.__setattr__(self, "capacity", cache_slots(self.max_new))

    def key(self) -> Array:
        """The PRNG key of `seed`."""
        return jax.random.PRNGKey(self.seed)

    def stop_array(self) -> Array:
        """Stop ids as an int32 array (never empty: -2 matches no token)."""
        return jnp.asarray(self.stop_ids or (-2,), jnp.int32)


def cache_slots(needed: int) -> int:
    """Cache length for `needed` slots, rounded up to SLOT_ROUNDING."""
    return -(-needed // SLOT_ROUNDING) * SLOT_ROUNDING


def init_cache(config: LlamaConfig, num_layers: int, batch: int, slots: int) -> Cache:
    """A zeroed KV cache for the first `num_layers` layers."""
    shape = (num_layers, batch, slots, config.num_kv_heads, config.kv_head_dim)
    return jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype)


def _mask(pad: Array, slot: Array, t: int, slots: int) -> Array:
    """[B, 1, T, S]: causal over slots, real keys only; a pad query sees itself (no empty rows)."""
    q = slot + jnp.arange(t)[:, None]
    k = jnp.arange(slots)[None, :]
    real = k[None] >= pad[:, None, None]
    return ((k <= q)[None] & (real | (k == q)[None]))[:, None]


def run_layers(config: LlamaConfig, params: dict, h: Array, cache: Cache, pad: Array,
               slot: Array, start, stop) -> tuple[Array, Cache]:
    """Run layers [start, stop) on hidden states h [B, T, D] sitting at slots slot..slot+T-1.

    Each step reads its layer's weights from the stacked params with a dynamic index (no
    slicing of the stack) and writes only the T new KV rows into the cache. Static bounds
    give a scan; traced bounds (dynamic exits) give a while loop, so one compilation serves
    every layer range.
    """
    t = h.shape[1]
    k_all, v_all = cache
    positions = jnp.maximum(slot + jnp.arange(t)[None, :] - pad[:, None], 0)
    cos, sin = rope_tables(config, positions)
    mask = _mask(pad, slot, t, k_all.shape[2])
    layer = DecoderLayer(config)

    def body(i, carry):
        h, k_all, v_all = carry
        take = lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)  # noqa: E731
        p = jax.tree.map(take, params["layers"])
        h, (k, v) = layer.apply({"params": p}, h, cos, sin, mask, (take(k_all), take(v_all)), slot)
        new = lambda c: jax.lax.dynamic_slice_in_dim(c, slot, t, axis=1)[None]  # noqa: E731
        k_all = jax.lax.dynamic_update_slice(k_all, new(k), (i, 0, slot, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_all, new(v), (i, 0, slot, 0, 0))
        return h, k_all, v_all

    h, k_all, v_all = jax.lax.fori_loop(start, stop, body, (h, k_all, v_all))
    return h, (k_all, v_all)


def exit_head(config: LlamaConfig, params: dict, h: Array, idx: Array) -> Array:
    """float32 logits of h at exit config.resolved_exits[idx], idx traced (ICT heads: a switch;
    idx is `exits.head_index`)."""
    if not exit_head_count(params):
        return head_logits(config, params, h, config.num_layers)
    branches = [partial(head_logits, config, params, exit_layer=e) for e in config.resolved_exits]
    return jax.lax.switch(idx, branches, h)


def filter_logits(logits: Array, s: Decoding) -> Array:
    """Temperature, then top-k (0 = off) and top-p (nucleus) masking, as float32 logits."""
    logits = logits.astype(jnp.float32) / jnp.maximum(s.temperature, 1e-6)
    desc = jnp.sort(logits, axis=-1)[..., ::-1]
    kth = jax.lax.dynamic_index_in_dim(desc, jnp.clip(s.top_k - 1, 0, desc.shape[-1] - 1), -1)
    logits = jnp.where((s.top_k > 0) & (logits < kth), -jnp.inf, logits)
    desc = jnp.where((s.top_k > 0) & (desc < kth), -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    cutoff = jnp.min(jnp.where(before < s.top_p, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample(probs: Array, u: Array) -> Array:
    """Inverse-CDF sample from each row of (unnormalised) probs [..., V] with uniforms u [...].

    One uniform per token keeps the random bits of a whole decoding round in one draw.
    """
    cdf = jnp.cumsum(probs, axis=-1)
    idx = jnp.sum(cdf < u[..., None] * cdf[..., -1:], axis=-1)
    return jnp.minimum(idx, probs.shape[-1] - 1).astype(jnp.int32)


def select_token(logits: Array, key: Array | None, s: Decoding) -> Array:
    """Next token per row [B] from logits [B, V]: argmax, or a sample from the filtered logits."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(filter_logits(logits, s), axis=-1)
    return sample(probs, jax.random.uniform(key, logits.shape[:-1]))


def forward(config: LlamaConfig, params: dict, tokens: Array, cache: Cache, pad: Array,
            slot: Array, layers) -> tuple[Array, Cache]:
    """Tokens [B, T] through the first `layers` layers at slot; returns their states and cache."""
    return run_layers(config, params, embed(config, params, tokens), cache, pad, slot, 0, layers)


@partial(jax.jit, static_argnames=("config", "slots"))
def _prefill(config: LlamaConfig, params: dict, tokens: Array, pad: Array, slots: int,
             layers: Array) -> Cache:
    cache = init_cache(config, config.num_layers, tokens.shape[0], slots)
    return forward(config, params, tokens, cache, pad, jnp.int32(0), layers)[1]


def prefill(config: LlamaConfig, params: dict, tokens: Array, pad: Array, slots: int,
            layers: int | None = None) -> Cache:
    """A fresh cache of `slots` slots holding the first `layers` layers (default all) of
    left-padded tokens [B, T]; the decode loops then start from each prompt's last token.

    The cache always has every layer's slot, so one compilation serves every sub-model.
    """
    if tokens.shape[1] == 0:
        return init_cache(config, config.num_layers, tokens.shape[0], slots)
    return _prefill(config, params, tokens, pad, slots, jnp.int32(layers or config.num_layers))


def prefill_prompts(config: LlamaConfig, params: dict, prompts: list[list[int]], extra: int,
                    layers: int | None = None) -> tuple[Cache, Array, Array, Array]:
    """The shared start of every decoding: left-pad the prompts and prefill all but their last
    tokens into a cache with room for `extra` more slots.

    Returns (cache, last tokens [B], pad [B], the slot of the last tokens).
    """
    p_len = max(len(p) for p in prompts)
    pad_id = config.pad_token_id or 0
    tokens = jnp.asarray([[pad_id] * (p_len - len(p)) + p for p in prompts], jnp.int32)
    pad = jnp.asarray([p_len - len(p) for p in prompts], jnp.int32)
    cache = prefill(config, params, tokens[:, :-1], pad, cache_slots(p_len + extra), layers)
    return cache, tokens[:, -1], pad, jnp.int32(p_len - 1)


def _decode_step(config: LlamaConfig, params: dict, cache: Cache, tokens: Array, pad: Array,
                 slot: Array, layers: Array, head_idx: Array) -> tuple[Array, Cache]:
    h, cache = forward(config, params, tokens[:, None], cache, pad, slot, layers)
    return exit_head(config, params, h[:, 0], head_idx), cache


decode_step = jax.jit(_decode_step, static_argnames=("config",), donate_argnames=("cache",))
decode_step.__doc__ = """One token per row [B] at `slot` through the first `layers` layers ->
(logits, cache). `head_idx` is exits.head_index(config, params, layers)."""


def token_loop(step: Callable, state, tokens: Array, aux, s: Decoding):
    """Emit up to s.max_new tokens per row on device. `step(state, tokens, i) -> (logits, state,
    aux)` feeds token i-1 (the prompt's last token for i = 0) and returns token i's logits.

    `aux` (an example pytree, e.g. the exit taken) is recorded per emitted token. Returns
    tokens [B, s.capacity] (-1 after a row stopped or past max_new), the number of steps, the
    final state and the aux record with a leading s.capacity axis.
    """
    b, key, stop_ids = tokens.shape[0], s.key(), s.stop_array()
    record = jax.tree.map(lambda a: jnp.zeros((s.capacity,) + a.shape, a.dtype), aux)

    def body(c):
        i, state, tok, done, out, record = c
        logits, state, aux = step(state, jnp.maximum(tok, 0), i)
        step_key = None if s.greedy else jax.random.fold_in(key, i)
        tok = jnp.where(done, -1, select_token(logits, step_key, s))
        record = jax.tree.map(lambda r, a: r.at[i].set(a), record, aux)
        return i + 1, state, tok, done | jnp.isin(tok, stop_ids), out.at[:, i].set(tok), record

    init = (jnp.int32(0), state, tokens, jnp.zeros((b,), bool),
            jnp.full((b, s.capacity), -1, jnp.int32), record)
    cond = lambda c: (c[0] < s.max_new) & ~jnp.all(c[3])  # noqa: E731
    i, state, _, _, out, record = jax.lax.while_loop(cond, body, init)
    return out, i, state, record


@partial(jax.jit, static_argnames=("config",))
def decode_loop(config: LlamaConfig, params: dict, cache: Cache, tokens: Array, pad: Array,
                slot: Array, layers: Array, head_idx: Array, s: Decoding) -> tuple[Array, Array]:
    """Plain decoding with the sub-model of the first `layers` layers, feeding the prompts'
    last tokens [B] at `slot`.

    Returns tokens [B, s.capacity] (-1 after a row stopped) and the number of steps taken.
    """
    def step(cache, tok, i):
        logits, cache = _decode_step(config, params, cache, tok, pad, slot + i, layers, head_idx)
        return logits, cache, ()

    out, steps, _, _ = token_loop(step, cache, tokens, (), s)
    return out, steps


def trim(row, stop_ids) -> list[int]:
    """Generated ids of one row up to and including the first stop token (-1 padding dropped)."""
    out = []
    for t in (int(x) for x in row):
        if t < 0:
            break
        out.append(t)
        if t in stop_ids:
            break
    return out
