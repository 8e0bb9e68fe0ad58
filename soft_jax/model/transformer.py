"""The LLaMA stack: embeddings, a scanned layer stack that emits the residual stream at the
sorted exits, and the shared final norm + LM head applied at every exit."""

from __future__ import annotations

import functools
from functools import partial
from types import MappingProxyType
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from soft_jax.model.config import REMAT_SAVES, LlamaConfig
from soft_jax.model.exits import head_kernel, uses_shared_head, with_last
from soft_jax.model.layers import DecoderLayer, dense_init, rms_norm, rope_tables
from soft_jax.parallel.sharding import RESIDUAL_AXES, boxed_axes, constrain, unbox

Array = jax.Array
Params = dict


def remat_policy(name: str):
    """The jax.checkpoint policy for a named remat setting (see config.REMAT_SAVES)."""
    cp = jax.checkpoint_policies
    if name == "save_dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload_dots":
        return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
    if name == "full":
        return None
    if name not in REMAT_SAVES or name == "none":
        raise ValueError(f"no remat policy for {name!r}; expected one of "
                         f"{[p for p in REMAT_SAVES if p != 'none']}")
    return cp.save_only_these_names(*REMAT_SAVES[name])


def check_tokens(name: str, x, vocab_size: int, allow: tuple[int, ...] = ()) -> None:
    """ValueError unless concrete `x` is a [batch, seq] integer array of ids in
    0..vocab_size-1 (values in `allow`, e.g. the -100 ignore index, pass too). Tracers and
    arrays spread over other processes are not checked: nothing runs inside jit."""
    if x is None or isinstance(x, jax.core.Tracer) or (
            isinstance(x, jax.Array) and not x.is_fully_addressable):
        return
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, seq]; got shape {arr.shape} (add a batch "
                         "axis: x[None])")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids; got dtype {arr.dtype}")
    bad = arr[((arr < 0) | (arr >= vocab_size)) & ~np.isin(arr, allow)]
    if bad.size:
        raise ValueError(f"{name} holds {bad.size} value(s) outside the vocabulary "
                         f"0..{vocab_size - 1}" + (f" (or {list(allow)})" if allow else "")
                         + f", e.g. {bad[:3].tolist()}")


def _stacked(boxes: Params) -> Params:
    """Layer params vmapped over the stack: a leading "layers" axis in front of each's names."""
    return jax.tree.map(lambda b: b.replace(names=("layers",) + tuple(b.names)), boxes,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def init_boxed_params(config: LlamaConfig, rng: Array) -> Params:
    """`init_params` with every leaf an `nn.LogicallyPartitioned` carrying its logical axes."""
    k_embed, k_layers, k_head, k_exit = jax.random.split(rng, 4)
    d, v, dt = config.hidden_size, config.vocab_size, config.weight_dtype
    x = jnp.zeros((1, 1, d), config.compute_dtype)
    cos, sin = rope_tables(config, jnp.zeros((1, 1), jnp.int32))
    layer_init = lambda k: DecoderLayer(config).init(k, x, cos, sin)["params"]  # noqa: E731
    ones = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    params = {
        "embed": {"embedding": dense_init(("vocab", "embed"))(k_embed, (v, d), dt)},
        "layers": _stacked(jax.vmap(layer_init)(jax.random.split(k_layers, config.num_layers))),
        "final_norm": {"scale": ones(None, (d,), dt)},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": dense_init(("embed", "vocab"))(k_head, (d, v), dt)}
    if config.num_exit_heads:
        params["exit_heads"] = {"kernel": dense_init(("exit_heads", "embed", "vocab"))(
            k_exit, (config.num_exit_heads, d, v), dt)}
    return params


def init_params(config: LlamaConfig, rng: Array) -> Params:
    """Random parameters (normal 0.02, norms at 1), layers stacked on a leading axis."""
    return unbox(init_boxed_params(config, rng))


@functools.lru_cache(maxsize=64)
def param_axes(config: LlamaConfig) -> Mapping[str, tuple[str | None, ...]]:
    """{dotted param path: logical names} as the params' initializers declare them."""
    boxed = jax.eval_shape(lambda: init_boxed_params(config, jax.random.PRNGKey(0)))
    return MappingProxyType(boxed_axes(boxed))


def window_mask(q_pos: Array, k_pos: Array, window: int | None) -> Array:
    """Causal (k <= q) and, with a sliding window, k within the last `window` positions of q
    (HF's `kv_idx > q_idx - sliding_window`); broadcasts q_pos [..., q, 1] with k_pos [..., k]."""
    causal = k_pos <= q_pos
    return causal if window is None else causal & (q_pos - k_pos < window)


def attention_mask(segment_ids: Array, window: int | None = None) -> Array:
    """Causal mask [batch, 1, q, k] that also keeps packed segments (and padding, id 0) apart,
    within a sliding window if one is given. Inside a segment positions are consecutive, so
    index distance is position distance."""
    idx = jnp.arange(segment_ids.shape[-1])
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (window_mask(idx[:, None], idx[None, :], window)[None] & same)[:, None]


def _exit_slots(exits: tuple[int, ...], num_layers: int) -> np.ndarray:
    """For layer i (0-based), the index of the first exit at or after it.

    Writing every layer's output into its slot leaves, once the scan is done, exactly the
    output of each exit layer there: later layers of a segment overwrite earlier ones.
    """
    return np.searchsorted(np.asarray(exits), np.arange(1, num_layers + 1)).astype(np.int32)


def _layer_fn(config: LlamaConfig):
    layer = DecoderLayer(config)

    def apply(p, h, cos, sin, mask):
        return constrain(layer.apply({"params": p}, h, cos, sin, mask)[0], RESIDUAL_AXES)

    if config.remat_policy == "none":
        return apply
    return jax.checkpoint(apply, policy=remat_policy(config.remat_policy),
                          prevent_cse=not config.scan_layers)


def _skippable(layer, keep: Array | None):
    """`layer` that, where keep[b] is False, passes sequence b's residual stream through
    unchanged (LayerSkip's layer dropout); `layer` itself when there is no mask."""
    if keep is None:
        return lambda p, h, k, *a: layer(p, h, *a)
    return lambda p, h, k, *a: jnp.where(k[:, None, None], layer(p, h, *a), h)


def run_stack(config: LlamaConfig, layers: Params, h: Array, cos: Array, sin: Array,
              mask: Array | None, exits: tuple[int, ...], keep: Array | None = None) -> Array:
    """Run all layers; return the residual stream after each exit layer, [n_exits, B, T, D].

    The scanned path keeps one [n_exits, B, T, D] buffer in the carry (one compiled body, no
    per-layer hidden states stacked); the unscanned path is a Python loop for reference.
    `keep` (bool [layers, B], training only) skips layer l for the sequences where it is False.
    """
    layer = _skippable(_layer_fn(config), keep)
    ks = jnp.ones((config.num_layers, 1), bool) if keep is None else keep
    if not config.scan_layers:
        outs = []
        for i in range(config.num_layers):
            h = layer(jax.tree.map(lambda p: p[i], layers), h, ks[i], cos, sin, mask)
            if i + 1 in exits:
                outs.append(h)
        return jnp.stack(outs)
    if exits == (config.num_layers,):
        def body(h, xs):
            p, k = xs
            return layer(p, h, k, cos, sin, mask), None
        return jax.lax.scan(body, h, (layers, ks))[0][None]

    def body(carry, xs):
        h, buf = carry
        p, slot, k = xs
        h = layer(p, h, k, cos, sin, mask)
        return (h, jax.lax.dynamic_update_index_in_dim(buf, h, slot, 0)), None

    buf = constrain(jnp.zeros((len(exits),) + h.shape, h.dtype),
                    ("activation_exits",) + RESIDUAL_AXES)
    slots = jnp.asarray(_exit_slots(exits, config.num_layers))
    return jax.lax.scan(body, (h, buf), (layers, slots, ks))[0][1]


def embed(config: LlamaConfig, params: Params, input_ids: Array) -> Array:
    """Token embeddings in the compute dtype."""
    # Under sharding rules (identity otherwise): gather the table's fsdp shards first, as for
    # any FSDP weight, so the lookup is a vocab-parallel gather, not a full rematerialisation.
    table = constrain(params["embed"]["embedding"], ("vocab", None))
    h = jnp.take(table, input_ids, axis=0).astype(config.compute_dtype)
    return constrain(h, RESIDUAL_AXES)


def exit_hidden_states(config: LlamaConfig, params: Params, input_ids: Array,
                       positions: Array | None = None, segment_ids: Array | None = None,
                       exits: tuple[int, ...] | None = None,
                       keep: Array | None = None) -> Array:
    """Raw (pre-norm) residual stream at each exit, [n_exits, batch, seq, hidden]; `keep`:
    the layer-dropout mask of `run_stack`."""
    exits = with_last(config, exits)
    b, t = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_tables(config, positions)
    mask = None if segment_ids is None else attention_mask(segment_ids, config.sliding_window)
    return run_stack(config, params["layers"], embed(config, params, input_ids), cos, sin, mask,
                     exits, keep)


def head_logits(config: LlamaConfig, params: Params, h: Array, exit_layer: int) -> Array:
    """float32 logits from a raw residual stream: final norm, then the head for that exit."""
    x = rms_norm(h, params["final_norm"]["scale"].astype(h.dtype), config.rms_norm_eps)
    x = x.astype(config.compute_dtype)
    if config.tie_word_embeddings and uses_shared_head(config, params, exit_layer):
        # Contract the [vocab, hidden] table directly: a transposed kernel is materialised
        # by XLA CPU (a full copy of the table per decoding step).
        table = params["embed"]["embedding"].astype(config.compute_dtype)
        return jnp.einsum("...d,vd->...v", x, table, preferred_element_type=jnp.float32)
    kernel = head_kernel(config, params, exit_layer).astype(config.compute_dtype)
    return jnp.einsum("...d,dv->...v", x, kernel, preferred_element_type=jnp.float32)


@partial(jax.jit, static_argnames=("config", "exits"))
def _exit_logits(config, params, input_ids, exits):
    hs = exit_hidden_states(config, params, input_ids, exits=exits)
    return {e: head_logits(config, params, hs[i], e) for i, e in enumerate(exits)}


def exit_logits(config: LlamaConfig, params: Params, input_ids,
                exits: tuple[int, ...] | None = None) -> dict[int, Array]:
    """Map each exit (1-based layer count) to float32 logits [batch, seq, vocab].

    `exits=None` means the config's exits (always with the last layer); an explicit tuple
    returns exactly those exits.
    """
    asked = with_last(config, exits)
    check_tokens("input_ids", input_ids, config.vocab_size)
    if exits is not None:
        wanted = sorted({int(e) for e in ([exits] if isinstance(exits, int) else exits)})
    else:
        wanted = list(asked)
    out = _exit_logits(config, params, jnp.asarray(input_ids, jnp.int32), asked)
    return {e: out[e] for e in wanted}
