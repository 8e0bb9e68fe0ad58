"""Chunked multi-exit cross-entropy: the SoFT loss without |exits| x tokens x vocab logits.

The plain loss (`loss.exit_loss_from_hidden`) builds float32 logits [B, T, V] for every
exit, and autodiff keeps all of them (or their softmax) alive until the backward pass:
|E| x tokens x vocab x 4 bytes. Here the exit axis is folded into the token axis and one
`lax.scan` walks over (exit, token-chunk) pairs; each step does

    raw hidden [B, Tc, D] -> final RMSNorm -> head matmul (compute dtype, float32 accumulation)
    -> float32 log-sum-exp -> target logit -> masked sums of CE and lse^2 (z-loss)

so at most one chunk of logits [B, Tc, V] exists at a time (C = B * Tc tokens). Gradients come from a
`jax.custom_vjp`, in one of two modes:

* ``fused`` (default, `impl="chunked"`): the loss is a known linear combination of the
  per-exit sums (exit weights / token count, z-loss coefficient), so the forward scan also
  forms d loss / d logits = c_e * m * (softmax - onehot) + zc_e * m * 2 * lse * softmax for
  the chunk while its logits are live, and pushes it through the head and the norm right
  away. The backward pass only scales the stored gradients by the incoming cotangent.
  Head FLOPs: 2 (logits) + 4 (d hidden, d kernel) = 6 per (exit, token, D, V) -- the same
  as the plain loss, no recompute. Residuals: d hidden [E, N, D] (replaces the hidden
  states, which are no longer needed) and the float32 head / norm gradients.
* ``recompute`` (`impl="chunked_recompute"`): the forward scan computes only the sums; the
  backward scan recomputes each chunk's logits (8 head FLOPs instead of 6). The outputs are
  the per-exit sums themselves, so any cotangent is handled exactly (e.g. gradients of one
  exit's loss alone).

Gradients of the head kernel, the norm scale and (via the head kernel) a tied embedding are
accumulated across chunks in float32. Chunks run along the sequence axis and keep the whole
batch (a batch-sharded hidden state is sliced locally); when Tc does not divide T the last
chunk is shifted back to end at the last position and the positions it shares with the
previous chunk are masked out, so nothing is padded or copied.
ICT per-exit heads: the kernel table is [K, D, V] and each exit reads row `kidx[exit]`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from soft_jax.model.exits import head_table
from soft_jax.model.layers import rms_norm

Array = jax.Array

# float32 logits per chunk: big on accelerators (the per-chunk float32 head-gradient
# accumulation, ~12 bytes x D x V, must stay small next to the chunk's 6 x C x D x V FLOPs),
# small on CPU (memory is what the chunking is for; CPU matmuls are efficient at C = 256).
CHUNK_LOGIT_BYTES = {"gpu": 512 * 2 ** 20, "tpu": 512 * 2 ** 20, "cpu": 32 * 2 ** 20}


def default_chunk_tokens(vocab_size: int, backend: str | None = None) -> int:
    """Tokens per chunk: the power of two (128..8192) whose float32 [C, V] logits fit
    CHUNK_LOGIT_BYTES of the backend (V = 32000: 4096 on GPU/TPU, 256 on CPU)."""
    budget = CHUNK_LOGIT_BYTES.get(backend or jax.default_backend(), CHUNK_LOGIT_BYTES["gpu"])
    c = max(1, budget // (4 * vocab_size))
    return int(min(8192, max(128, 2 ** int(math.log2(c)))))


def chunk_positions(chunk_tokens: int, batch: int, seq: int) -> int:
    """Sequence positions per chunk: chunk_tokens // batch, within 1..seq."""
    return max(1, min(seq, chunk_tokens // batch))


class ChunkSpec(NamedTuple):
    """Static (hashable) settings of one chunked-loss call."""

    eps: float
    compute_dtype: str  # numpy dtype name, e.g. "float32" / "bfloat16"
    chunk: int  # sequence positions per chunk (x batch = tokens per chunk)
    kidx: tuple[int, ...]  # per exit: row of the kernel table to use
    distill: bool = False  # also KL(p_last || p_exit), the last exit's chunk as the teacher


def _layout(spec: ChunkSpec, hidden: Array) -> tuple[int, int, int, int, int]:
    """(exits, batch, seq, hidden, chunks per exit) for hidden [E, B, T, D]."""
    e, b, t, d = hidden.shape
    return e, b, t, d, -(-t // spec.chunk)


def _norm(spec: ChunkSpec, h: Array, scale: Array) -> Array:
    """Exactly `model.head_logits`' normalisation: norm in float32, weight in h's dtype."""
    x = rms_norm(h, scale.astype(h.dtype), spec.eps)
    return x.astype(spec.compute_dtype)


def _chunk_inputs(spec: ChunkSpec, hidden, kernels, targets, mask, i):
    """Chunk `i` (exit-major): hidden [B, Tc, D], kernel [D, V], targets, mask, start.

    Chunks run along the sequence axis and keep the whole batch, so a batch-sharded hidden
    state is sliced locally (the sequence axis is never sharded).
    """
    _, b, t, d, n_c = _layout(spec, hidden)
    c = spec.chunk
    e = i // n_c
    j = i % n_c
    start = jnp.minimum(j * c, t - c)
    h = jax.lax.dynamic_slice(hidden, (e, 0, start, 0), (1, b, c, d))[0]
    tg = jax.lax.dynamic_slice_in_dim(targets, start, c, axis=1)
    # positions before j*C belong to the previous chunk (only when the last one is shifted)
    fresh = (start + jnp.arange(c, dtype=jnp.int32)) >= j * c
    m = jax.lax.dynamic_slice_in_dim(mask, start, c, axis=1) * fresh.astype(mask.dtype)
    return e, start, h, _kernel(spec, kernels, e), tg, m


def _kernel(spec: ChunkSpec, kernels: Array, e) -> Array:
    """The head kernel [D, V] of exit index `e`."""
    if kernels.shape[0] == 1:
        return kernels[0]
    k = jnp.asarray(spec.kidx, jnp.int32)[e]
    return jax.lax.dynamic_index_in_dim(kernels, k, 0, keepdims=False)


def _teacher(spec: ChunkSpec, hidden, scale, kernels, start):
    """(softmax, log-softmax) of the last exit's logits at the chunk's positions, no gradient:
    the self-distillation teacher, one more [B, Tc, V] block in the same chunk."""
    _, b, _, d, _ = _layout(spec, hidden)
    last = hidden.shape[0] - 1
    h = jax.lax.dynamic_slice(hidden, (last, 0, start, 0), (1, b, spec.chunk, d))[0]
    logits = _logits(spec, _norm(spec, h, scale), _kernel(spec, kernels, last))
    logq = jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1)
    return jnp.exp(logq), logq


def _kl(q, logq, logits, lse):
    """Per-token KL(q || softmax(logits)) from the student's float32 logits and lse."""
    return jnp.sum(q * (logq - logits), axis=-1) + lse


def _logits(spec: ChunkSpec, x: Array, kernel: Array) -> Array:
    return jnp.einsum("btd,dv->btv", x, kernel.astype(spec.compute_dtype),
                      preferred_element_type=jnp.float32)


def _lse_parts(logits: Array):
    """(lse, softmax) in float32 from float32 logits, one exp pass."""
    mx = jnp.max(logits, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    ex = jnp.exp(logits - mx)
    s = jnp.sum(ex, axis=-1, keepdims=True)
    return (mx + jnp.log(s))[..., 0], ex / s


def _target_logit(logits: Array, t: Array) -> Array:
    return jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]


def _value_scan(spec: ChunkSpec, hidden, scale, kernels, targets, mask):
    """Per-exit masked sums of CE, lse^2 and (with spec.distill, else 0) KL to the last
    exit, float32 [E] each. No gradients."""
    e_count, _, _, _, n_c = _layout(spec, hidden)

    def body(sums, i):
        e, start, h, kernel, t, m = _chunk_inputs(spec, hidden, kernels, targets, mask, i)
        logits = _logits(spec, _norm(spec, h, scale), kernel)
        lse = jax.nn.logsumexp(logits, axis=-1)
        ce = lse - _target_logit(logits, t)
        kl = (jnp.sum(_kl(*_teacher(spec, hidden, scale, kernels, start), logits, lse) * m)
              if spec.distill else 0.0)
        return sums.at[:, e].add(jnp.stack([jnp.sum(ce * m), jnp.sum(lse * lse * m), kl])), None

    sums = jax.lax.scan(body, jnp.zeros((3, e_count), jnp.float32),
                        jnp.arange(e_count * n_c, dtype=jnp.int32))[0]
    return sums[0], sums[1], sums[2]


def _grad_scan(spec: ChunkSpec, hidden, scale, kernels, targets, mask, coef, zcoef, kcoef):
    """Sums as `_value_scan`, plus the gradients of sum_e coef_e*ce_e + zcoef_e*z_e +
    kcoef_e*kl_e (the teacher held fixed).

    Returns (ce_sums, z_sums, kl_sums, d_hidden, d_scale, d_kernels) with d_hidden in hidden's
    dtype and the others in their parameter dtypes (accumulated in float32).
    """
    e_count, b, _, d, n_c = _layout(spec, hidden)
    c = spec.chunk
    single = kernels.shape[0] == 1
    dk0 = jnp.zeros(kernels.shape[1:] if single else kernels.shape, jnp.float32)

    def body(carry, i):
        sums, dh_buf, dscale, dk = carry
        e, start, h, kernel, t, m = _chunk_inputs(spec, hidden, kernels, targets, mask, i)
        x, norm_vjp = jax.vjp(partial(_norm, spec), h, scale)
        kc = kernel.astype(spec.compute_dtype)
        logits = _logits(spec, x, kc)
        lse, p = _lse_parts(logits)
        tl = _target_logit(logits, t)
        a = m * coef[e]
        zb = m * zcoef[e] * 2.0 * lse
        onehot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == t[..., None]
        dlogits = p * (a + zb)[..., None] - jnp.where(onehot, a[..., None], 0.0)
        kl = 0.0
        if spec.distill:  # d KL(q || p) / d logits = p - q
            q, logq = _teacher(spec, hidden, scale, kernels, start)
            kl = jnp.sum(_kl(q, logq, logits, lse) * m)
            dlogits = dlogits + (m * kcoef[e])[..., None] * (p - q)
        sums = sums.at[:, e].add(jnp.stack([jnp.sum((lse - tl) * m), jnp.sum(lse * lse * m),
                                            kl]))
        dl = dlogits.astype(spec.compute_dtype)
        dx = jnp.einsum("btv,dv->btd", dl, kc, preferred_element_type=jnp.float32)
        dk_c = jnp.einsum("btd,btv->dv", x, dl, preferred_element_type=jnp.float32)
        dh, ds = norm_vjp(dx.astype(x.dtype))
        prev = jax.lax.dynamic_slice(dh_buf, (e, 0, start, 0), (1, b, c, d))
        dh_buf = jax.lax.dynamic_update_slice(dh_buf, prev + dh[None].astype(dh_buf.dtype),
                                              (e, 0, start, 0))
        dscale = dscale + ds.astype(jnp.float32)
        if single:
            dk = dk + dk_c
        else:
            k = jnp.asarray(spec.kidx, jnp.int32)[e]
            dk = jax.lax.dynamic_update_index_in_dim(dk, dk[k] + dk_c, k, 0)
        return (sums, dh_buf, dscale, dk), None

    init = (jnp.zeros((3, e_count), jnp.float32), jnp.zeros_like(hidden),
            jnp.zeros(scale.shape, jnp.float32), dk0)
    sums, dh, dscale, dk = jax.lax.scan(body, init,
                                        jnp.arange(e_count * n_c, dtype=jnp.int32))[0]
    dk = (dk[None] if single else dk).astype(kernels.dtype)
    return sums[0], sums[1], sums[2], dh, dscale.astype(scale.dtype), dk


# ------------------------------------------------------------------ fused: grads in forward
def _combined(coef, zcoef, kcoef, ce, z, kl):
    return jnp.sum(coef * ce) + jnp.sum(zcoef * z) + jnp.sum(kcoef * kl)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(spec, hidden, scale, kernels, targets, mask, coef, zcoef, kcoef):
    sums = _value_scan(spec, hidden, scale, kernels, targets, mask)
    return (_combined(coef, zcoef, kcoef, *sums), *sums)


def _fused_fwd(spec, hidden, scale, kernels, targets, mask, coef, zcoef, kcoef):
    *sums, dh, ds, dk = _grad_scan(spec, hidden, scale, kernels, targets, mask, coef, zcoef,
                                   kcoef)
    return (_combined(coef, zcoef, kcoef, *sums), *sums), (dh, ds, dk)


def _fused_bwd(spec, res, cts):
    dh, ds, dk = res
    g = cts[0]  # the per-exit sums are returned under stop_gradient by the caller
    mul = lambda x: (g * x.astype(jnp.float32)).astype(x.dtype)  # noqa: E731
    return mul(dh), mul(ds), mul(dk), None, None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# ------------------------------------------------------- recompute: logits again in backward
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recompute(spec, hidden, scale, kernels, targets, mask):
    return _value_scan(spec, hidden, scale, kernels, targets, mask)


def _recompute_fwd(spec, hidden, scale, kernels, targets, mask):
    out = _value_scan(spec, hidden, scale, kernels, targets, mask)
    return out, (hidden, scale, kernels, targets, mask)


def _recompute_bwd(spec, res, cts):
    hidden, scale, kernels, targets, mask = res
    *_, dh, ds, dk = _grad_scan(spec, hidden, scale, kernels, targets, mask,
                                *(g.astype(jnp.float32) for g in cts))
    return dh, ds, dk, None, None


_recompute.defvjp(_recompute_fwd, _recompute_bwd)


# ------------------------------------------------------------------------------ public API
def chunked_exit_sums(config, params, hidden: Array, targets: Array, mask: Array,
                      exits: tuple[int, ...], *, chunk_tokens: int | None = None,
                      coef: Array | None = None, zcoef: Array | None = None,
                      kcoef: Array | None = None, distill: bool = False):
    """Per-exit masked sums of CE, lse^2 and KL(p_last || p_exit) over hidden [E, B, T, D]
    without full logits (the KL sums are 0 unless `distill`).

    Chunks are [B, chunk_tokens // B, V] blocks of logits (whole batch, a slice of positions);
    with `distill` each chunk also holds the last exit's block at the same positions.

    With `coef`/`zcoef`/`kcoef` (float32 [E], no gradient) the fused mode is used and the
    first output is the differentiable scalar sum_e coef_e*ce_e + zcoef_e*z_e + kcoef_e*kl_e;
    the per-exit sums are then returned under stop_gradient. Without them the recompute mode
    is used and the first output is None; the sums are differentiable (the teacher is not).
    Returns (scalar or None, ce_sums [E], z_sums [E], kl_sums [E]).
    """
    e_count, b, t, _ = hidden.shape
    if e_count != len(exits):
        raise ValueError(f"hidden has {e_count} exits but exits={exits}")
    chunk = int(chunk_tokens or default_chunk_tokens(config.vocab_size))
    if chunk <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    kernels, kidx = head_table(config, params, exits)
    spec = ChunkSpec(float(config.rms_norm_eps), jnp.dtype(config.compute_dtype).name,
                     chunk_positions(chunk, b, t), kidx, bool(distill))
    targets = targets.reshape(b, t).astype(jnp.int32)
    m = mask.reshape(b, t).astype(jnp.float32)
    scale = params["final_norm"]["scale"]
    if coef is None:
        return (None, *_recompute(spec, hidden, scale, kernels, targets, m))
    fixed = [jax.lax.stop_gradient((jnp.zeros_like(coef) if c is None else c).astype(
        jnp.float32)) for c in (coef, zcoef, kcoef)]
    loss, *sums = _fused(spec, hidden, scale, kernels, targets, m, *fixed)
    return (loss, *(jax.lax.stop_gradient(x) for x in sums))
