"""One LLaMA decoder layer in Flax Linen: RMSNorm, rotate-half RoPE, GQA attention, SwiGLU.

The layer stack, exits and heads live in `model.py`; this file is the per-layer math only,
written to match Hugging Face's LlamaDecoderLayer numerically.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from soft_jax.config import LlamaConfig

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

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale.astype(x.dtype), self.eps)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies (float32), with HF's `linear` and `llama3` scalings."""
    dim = config.kv_head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    if config.rope_scaling is None or config.rope_scaling[0] == "default":
        return inv
    rope_type, factor, low, high, original_max = config.rope_scaling
    if rope_type == "linear":
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


def _dense_init():
    return nn.initializers.normal(stddev=0.02)


class Attention(nn.Module):
    """Grouped-query self-attention with an optional preallocated KV cache."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask=None, cache=None, cache_index=None):
        cfg = self.config
        dense = lambda feats, axis, name: nn.DenseGeneral(  # noqa: E731
            feats, axis=axis, use_bias=False, dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype, kernel_init=_dense_init(), name=name)
        hd = cfg.kv_head_dim
        q = dense((cfg.num_heads, hd), -1, "q_proj")(x)
        k = dense((cfg.num_kv_heads, hd), -1, "k_proj")(x)
        v = dense((cfg.num_kv_heads, hd), -1, "v_proj")(x)
        q = checkpoint_name(apply_rope(q, cos, sin), "query_proj")
        k = checkpoint_name(apply_rope(k, cos, sin), "key_proj")
        v = checkpoint_name(v, "value_proj")
        if cache is not None:
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, 1)
            cache = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=mask is None,
            implementation=attention_impl(cfg, mask is not None, q.dtype))
        out = dense(cfg.hidden_size, (-2, -1), "o_proj")(out)
        return checkpoint_name(out, "attn_out"), cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda feats, name: nn.Dense(  # noqa: E731
            feats, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
            kernel_init=_dense_init(), name=name)
        gate = checkpoint_name(dense(cfg.intermediate_size, "gate_proj")(x), "mlp_gate")
        up = checkpoint_name(dense(cfg.intermediate_size, "up_proj")(x), "mlp_up")
        return checkpoint_name(dense(cfg.hidden_size, "down_proj")(nn.silu(gate) * up), "mlp_out")


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask=None, cache=None, cache_index=None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype, name=name)  # noqa: E731
        attn_out, cache = Attention(cfg, name="attn")(
            norm("input_norm")(x), cos, sin, mask, cache, cache_index)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm("post_attn_norm")(x))
        return x, cache
