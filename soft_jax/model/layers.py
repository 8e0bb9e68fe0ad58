"""One LLaMA decoder layer in Flax Linen: RMSNorm, rotate-half RoPE, GQA attention, SwiGLU,
with the options of the other families (q/k/v biases, per-head q/k norm), each used only
where the config sets it.

The layer stack lives in `model.py`, exits and heads in `exits.py`; this file is the per-layer
math only, written to match Hugging Face's LlamaDecoderLayer numerically.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from soft_jax.model.config import LlamaConfig

Array = jax.Array


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """HF LlamaRMSNorm: normalise in float32, cast back, then multiply by the weight."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * x32.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel scale named `scale`."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"  # the scale's logical axis

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ones = nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,))
        scale = self.param("scale", ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale.astype(x.dtype), self.eps)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies (float32), with HF's `linear` and `llama3` scalings."""
    dim = config.kv_head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type == "default":
        return inv
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    original_max = scaling.original_max_position_embeddings
    if scaling.rope_type == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    low_wavelen, high_wavelen = original_max / low, original_max / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_max / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: LlamaConfig, positions: Array) -> tuple[Array, Array]:
    """cos/sin tables [batch, seq, head_dim] for integer positions [batch, seq]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE on [batch, seq, heads, head_dim] (HF layout: no q/k permutation)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_impl(config: LlamaConfig, has_mask: bool, dtype,
                   backend: str | None = None) -> str:
    """cuDNN's fused kernel on GPU for the plain causal case, XLA otherwise (`backend`:
    the one to decide for, default jax's)."""
    if config.attention_impl is not None:
        return config.attention_impl
    on_gpu = (backend or jax.default_backend()) == "gpu"
    if not has_mask and on_gpu and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def dense_init(names: tuple[str, ...]):
    """Normal(0.02) kernels that carry their logical axes (see parallel.sharding.RULES)."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), names)


class Attention(nn.Module):
    """Grouped-query self-attention with an optional preallocated KV cache."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        def dense(feats, axis, names, bias=False):
            return nn.DenseGeneral(
                feats, axis=axis, use_bias=bias, dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype, kernel_init=dense_init(names),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))

        hd, bias = cfg.kv_head_dim, cfg.qkv_bias
        self.q_proj = dense((cfg.num_heads, hd), -1, ("embed", "q_heads", "head_dim"), bias)
        self.k_proj = dense((cfg.num_kv_heads, hd), -1, ("embed", "kv_heads", "head_dim"), bias)
        self.v_proj = dense((cfg.num_kv_heads, hd), -1, ("embed", "kv_heads", "head_dim"), bias)
        self.o_proj = dense(cfg.hidden_size, (-2, -1), ("q_heads", "head_dim", "embed"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype, "head_norm")
            self.k_norm = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype, "head_norm")

    def _project(self, proj, norm: str, x, cos, sin, tag: str):
        """proj(x), per-head normed first when the config has q/k norm, then RoPE."""
        y = proj(x)
        if self.config.qk_norm:
            y = getattr(self, norm)(checkpoint_name(y, tag + "_pre_norm"))
        return checkpoint_name(apply_rope(y, cos, sin), tag + "_proj")

    def kv(self, x, cos, sin):
        """Keys (after RoPE) and values of the normed input x, [batch, seq, kv_heads, head_dim]."""
        k = self._project(self.k_proj, "k_norm", x, cos, sin, "key")
        return k, checkpoint_name(self.v_proj(x), "value_proj")

    def __call__(self, x, cos, sin, mask=None, cache=None, cache_index=None):
        q = self._project(self.q_proj, "q_norm", x, cos, sin, "query")
        k, v = self.kv(x, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, 1)
            cache = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        window = self.config.sliding_window
        # unmasked calls keep the fused kernel: the window is its local_window_size
        # (HF's kv_idx > q_idx - window: window - 1 keys back, none ahead)
        local = (window - 1, 0) if mask is None and window is not None else None
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=mask is None, local_window_size=local,
            implementation=attention_impl(self.config, mask is not None, q.dtype))
        return checkpoint_name(self.o_proj(out), "attn_out"), cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda feats, name, names: nn.Dense(  # noqa: E731
            feats, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
            kernel_init=dense_init(names), name=name)
        up_names = ("embed", "mlp")
        gate = checkpoint_name(dense(cfg.intermediate_size, "gate_proj", up_names)(x), "mlp_gate")
        up = checkpoint_name(dense(cfg.intermediate_size, "up_proj", up_names)(x), "mlp_up")
        out = dense(cfg.hidden_size, "down_proj", ("mlp", "embed"))(nn.silu(gate) * up)
        return checkpoint_name(out, "mlp_out")


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.input_norm = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype)
        self.mlp = MLP(cfg)

    def kv(self, x, cos, sin):
        """This layer's keys and values of the residual stream x (what attention caches)."""
        return self.attn.kv(self.input_norm(x), cos, sin)

    def __call__(self, x, cos, sin, mask=None, cache=None, cache_index=None):
        attn_out, cache = self.attn(self.input_norm(x), cos, sin, mask, cache, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return x, cache
