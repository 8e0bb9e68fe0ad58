"""Decoding engine: a preallocated KV cache, a runner for any contiguous range of layers, jitted
prefill and decode loop, and token selection (greedy, temperature, top-k, top-p).

Cache layout: one (k, v) pair per layer, each [batch, slots, kv_heads, head_dim]. Prompts are
left-padded so every row writes the same slot each step; row b's real tokens start at slot
`pad[b]` and its RoPE position is `slot - pad[b]`. A key is visible to a query when it is at or
before the query's slot and is a real token, so entries beyond the current length (stale
drafts, garbage rows) are never read: rolling back a cache is just moving the write slot back.

Weights: on CPU, decoding reads the layer stack split into one weight dict per layer
(`for_decoding`). A layer taken out of the stacked [layers, ...] arrays with an index inside
the loop is copied on XLA CPU before every dot (docs/profile.md: 57% of a token's time); per
layer arrays reach the dots in place. On accelerators the stack is read as it is (one copy of
the weights). Per-layer caches likewise update in place.
"""

from __future__ import annotations

import dataclasses
import weakref
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from soft_jax.model.config import LlamaConfig
from soft_jax.model.exits import exit_head_count
from soft_jax.model.layers import DecoderLayer, rope_tables
from soft_jax.model.transformer import embed, head_logits, window_mask

Array = jax.Array
Cache = tuple[tuple[Array, Array], ...]  # (k, v) per layer
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


def init_cache(config: LlamaConfig, batch: int, slots: int) -> Cache:
    """A zeroed KV cache of every layer."""
    shape = (batch, slots, config.num_kv_heads, config.kv_head_dim)
    zeros = lambda: jnp.zeros(shape, config.compute_dtype)  # noqa: E731
    return tuple((zeros(), zeros()) for _ in range(config.num_layers))


def cache_length(cache: Cache) -> int:
    """Number of slots in the cache."""
    return cache[0][0].shape[1]


def _per_layer(stacked: dict) -> tuple[dict, ...]:
    n = jax.tree.leaves(stacked)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))


_split = jax.jit(_per_layer)


_SPLIT_CACHE: list = []  # [(weakrefs to the stacked leaves, split layers)]: the latest params


def for_decoding(params: dict) -> dict:
    """On XLA CPU, `params` with the layer stack as a tuple of per-layer weight dicts (what
    the decoding loops read without copying). Made once per params tree: the split of the
    latest tree is kept while its arrays live, at the cost of a second copy of the layer
    weights. Elsewhere `params` as they are: a second copy does not fit beside a model sized
    to the device, and the TPU compiler reads the stack's layers in place for the greedy loop
    (`soft-jax compile --decode`, LLaMA-2 7B bf16 on one v5e chip: 1.08 GiB of temporaries
    from the stack, 1.04 from the copy). Its self-speculative loop is not copy-free there yet:
    17.7 GiB of temporaries from the stack, as much as the copy it would otherwise need."""
    layers = params["layers"]
    leaves = jax.tree.leaves(layers)
    if isinstance(layers, tuple) or not _on_cpu(leaves[0]):
        return params
    hit = _SPLIT_CACHE[0] if _SPLIT_CACHE else None
    if hit is None or len(hit[0]) != len(leaves) or any(r() is not x for r, x in zip(hit[0], leaves)):
        hit = ([weakref.ref(x) for x in leaves], _split(layers))
        _SPLIT_CACHE[:] = [hit]
        for x in leaves:  # the split dies with its params (it can never match again)
            weakref.finalize(x, _forget, id(hit))
    return {**params, "layers": hit[1]}


def _on_cpu(x) -> bool:
    if isinstance(x, jax.Array):
        return all(d.platform == "cpu" for d in x.devices())
    return jax.default_backend() == "cpu"


def _forget(entry_id: int) -> None:
    _SPLIT_CACHE[:] = [e for e in _SPLIT_CACHE if id(e) != entry_id]


def layer_weights(params: dict) -> tuple[dict, ...]:
    """The per-layer weight dicts: for_decoding's split, else a split made inside the caller's
    trace (a copy per call)."""
    layers = params["layers"]
    return layers if isinstance(layers, tuple) else _per_layer(layers)


def _mask(pad: Array, slot: Array, t: int, slots: int, window: int | None) -> Array:
    """[B, 1, T, S]: causal over slots (within the sliding window, if any: slot distance is
    position distance), real keys only; a pad query sees itself (no empty rows)."""
    q = slot + jnp.arange(t)[:, None]
    k = jnp.arange(slots)[None, :]
    real = k[None] >= pad[:, None, None]
    return (window_mask(q, k, window)[None] & (real | (k == q)[None]))[:, None]


def _in_range(i: int, start, stop):
    """Whether layer i is in [start, stop): a bool for static bounds, else a traced one."""
    if isinstance(start, int) and isinstance(stop, int):
        return start <= i < stop
    return (start <= i) & (i < stop)


def run_layers(config: LlamaConfig, params: dict, h: Array, cache: Cache, pad: Array,
               slot: Array, start, stop) -> tuple[Array, Cache]:
    """Run layers [start, stop) on hidden states h [B, T, D] sitting at slots slot..slot+T-1,
    writing their T new KV rows into the cache.

    Every layer is its own code: static bounds leave out the layers outside, traced bounds
    (dynamic exits, one compilation for every range) put each layer under a `cond` that
    passes only its own weights and cache.
    """
    t = h.shape[1]
    positions = jnp.maximum(slot + jnp.arange(t)[None, :] - pad[:, None], 0)
    cos, sin = rope_tables(config, positions)
    mask = _mask(pad, slot, t, cache_length(cache), config.sliding_window)
    layer = DecoderLayer(config)
    cache = list(cache)
    for i, p in enumerate(layer_weights(params)):
        run = lambda h, c, p=p: layer.apply({"params": p}, h, cos, sin, mask, c, slot)  # noqa: E731
        take = _in_range(i, start, stop)
        if take is True:
            h, cache[i] = run(h, cache[i])
        elif take is not False:
            h, cache[i] = jax.lax.cond(take, run, lambda h, c: (h, c), h, cache[i])
    return h, tuple(cache)


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
    cache = init_cache(config, tokens.shape[0], slots)
    return forward(config, params, tokens, cache, pad, jnp.int32(0), layers)[1]


def prefill(config: LlamaConfig, params: dict, tokens: Array, pad: Array, slots: int,
            layers: int | None = None) -> Cache:
    """A fresh cache of `slots` slots holding the first `layers` layers (default all) of
    left-padded tokens [B, T]; the decode loops then start from each prompt's last token.

    The cache always has every layer's slot, so one compilation serves every sub-model.
    """
    if tokens.shape[1] == 0:
        return init_cache(config, tokens.shape[0], slots)
    return _prefill(config, for_decoding(params), tokens, pad, slots,
                    jnp.int32(layers or config.num_layers))


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
