"""The sorted multi-exit loss: (1/|exits|) * sum_exits CE_exit through the shared head.

Recipes (soft_jax/train/recipes.py) change the exit weights (`weights`), add a
self-distillation term `distill * sum_e w_e KL(p_last || p_e)` with a stop-gradient teacher,
or drop layers (`keep`); the defaults are the paper's mean.

Two implementations, chosen by `loss_fn(..., impl=...)`:

* ``"plain"``: `exit_loss_from_hidden`, float32 [B, T, V] logits per exit (autodiff keeps
  all exits' logits for the backward pass: |E| x tokens x vocab x 4 bytes).
* ``"chunked"``: `chunked_loss`, one [chunk, V] block of logits at a time, gradients formed
  in the same pass (same FLOPs as plain); ``"chunked_recompute"`` recomputes the logits in the
  backward pass instead (more FLOPs, exact for any cotangent of the per-exit sums).
* ``"auto"`` (default): ``"chunked"`` when the logits of all exits would span more than two
  chunks (|E| * B * T > 2 * chunk_tokens), ``"plain"`` otherwise (tiny batches, tests).
  `chunk_tokens` defaults to `chunked_loss.default_chunk_tokens(vocab)`: 4096 on GPU/TPU and
  256 on CPU for a 32k vocabulary.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from soft_jax.train.chunked_loss import chunked_exit_sums, default_chunk_tokens
from soft_jax.model.config import LlamaConfig
from soft_jax.model.exits import with_last
from soft_jax.model.transformer import check_tokens, exit_hidden_states, head_logits

Array = jax.Array
IGNORE_INDEX = -100
LOSS_IMPLS = ("auto", "plain", "chunked", "chunked_recompute")


def batch_targets(batch: dict) -> tuple[Array, Array]:
    """(targets, mask) aligned with `input_ids` from a batch with `targets` or HF-style `labels`.

    `targets[t]` is the token to predict after position t. `labels` follow Hugging Face: the
    same positions as `input_ids`, shifted here, -100 ignored. `loss_mask` (optional, aligned
    with the targets) masks prompt tokens; targets equal to -100 are masked too.
    """
    if "targets" in batch:
        targets = jnp.asarray(batch["targets"])
    elif "labels" in batch:
        labels = jnp.asarray(batch["labels"])
        targets = jnp.concatenate(
            [labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    else:
        raise KeyError(f"batch needs 'targets' or 'labels' (got keys {sorted(batch)})")
    mask = targets != IGNORE_INDEX
    if batch.get("loss_mask") is not None:
        mask = mask & (jnp.asarray(batch["loss_mask"]) > 0)
    return jnp.where(mask, targets, 0).astype(jnp.int32), mask


def check_batch(config: LlamaConfig, batch: dict) -> None:
    """ValueError for bad token ids / targets / labels in a concrete batch (see check_tokens)."""
    if "input_ids" not in batch:
        raise KeyError(f"batch needs 'input_ids' (got keys {sorted(batch)})")
    check_tokens("input_ids", batch["input_ids"], config.vocab_size)
    for key in ("targets", "labels"):
        check_tokens(key, batch.get(key), config.vocab_size, allow=(IGNORE_INDEX,))


def exit_weights(config: LlamaConfig, exits: tuple[int, ...], weights=None) -> Array:
    """Per-exit loss weights normalised to sum 1: `weights` if given (may be traced, e.g. a
    one-hot per step for SortedNet), else the config's, else equal."""
    if weights is not None:
        w = jnp.asarray(weights, jnp.float32)
    elif config.exit_weights is not None and exits == config.resolved_exits:
        w = jnp.asarray(config.exit_weights, jnp.float32)
    else:
        w = jnp.ones((len(exits),), jnp.float32)
    return w / w.sum()


def token_cross_entropy(logits: Array, targets: Array) -> tuple[Array, Array]:
    """Per-token cross-entropy and log-sum-exp from float32 logits."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target_logit, lse


def combine_exit_losses(config: LlamaConfig, exits: tuple[int, ...], per_exit_sum: Array,
                        count: Array, z_sum: Array | None = None, z_loss: float = 0.0,
                        weights=None, kl_sum: Array | None = None,
                        distill: float = 0.0) -> tuple[Array, dict]:
    """Token means per exit, their weighted mean, and the metrics dict."""
    denom = jnp.maximum(count, 1.0)
    per_exit = per_exit_sum / denom
    w = exit_weights(config, exits, weights)
    loss = jnp.sum(w * per_exit)
    metrics = {"loss": loss, "num_tokens": count}
    metrics.update({f"loss/exit_{e}": per_exit[i] for i, e in enumerate(exits)})
    if z_sum is not None and z_loss:
        z = jnp.sum(w * z_sum / denom)
        metrics["z_loss"] = z
        loss = loss + z_loss * z
    if kl_sum is not None and distill:
        kl = kl_sum / denom
        metrics.update({f"kl/exit_{e}": kl[i] for i, e in enumerate(exits[:-1])})
        loss = loss + distill * jnp.sum(w * kl)
    return loss, metrics


def teacher_kl(logits: Array, teacher_logits: Array) -> Array:
    """Per-token KL(softmax(teacher) || softmax(logits)), the teacher held fixed."""
    logq = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
    return jnp.sum(jnp.exp(logq) * (logq - jax.nn.log_softmax(logits, axis=-1)), axis=-1)


def exit_loss_from_hidden(config: LlamaConfig, params, hidden: Array, targets: Array,
                          mask: Array, exits: tuple[int, ...], z_loss: float = 0.0,
                          weights=None, distill: float = 0.0) -> tuple[Array, dict]:
    """Plain multi-exit loss: materialises each exit's [B, T, V] logits (one at a time)."""
    m = mask.astype(jnp.float32)
    teacher = head_logits(config, params, hidden[-1], exits[-1]) if distill else None
    sums, zs, kls = [], [], []
    for i, e in enumerate(exits):
        logits = head_logits(config, params, hidden[i], e)
        ce, lse = token_cross_entropy(logits, targets)
        sums.append(jnp.sum(ce * m))
        zs.append(jnp.sum(lse * lse * m))
        if distill:
            kls.append(jnp.sum(teacher_kl(logits, teacher) * m))
    return combine_exit_losses(config, exits, jnp.stack(sums), m.sum(), jnp.stack(zs), z_loss,
                               weights, jnp.stack(kls) if distill else None, distill)


def resolve_loss_impl(impl: str, n_exits: int, n_tokens: int, chunk_tokens: int | None = None,
                      vocab_size: int = 32000, backend: str | None = None) -> str:
    """The concrete implementation `impl` means for |E| exits of `n_tokens` (= B*T) tokens
    (`backend`: the one whose default chunk applies, default jax's)."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss impl {impl!r}; expected one of {LOSS_IMPLS}")
    if impl != "auto":
        return impl
    chunk = chunk_tokens or default_chunk_tokens(vocab_size, backend)
    return "chunked" if n_exits * n_tokens > 2 * chunk else "plain"


def chunked_exit_loss_from_hidden(config: LlamaConfig, params, hidden: Array, targets: Array,
                                  mask: Array, exits: tuple[int, ...], z_loss: float = 0.0,
                                  chunk_tokens: int | None = None, recompute: bool = False,
                                  weights=None, distill: float = 0.0) -> tuple[Array, dict]:
    """Same loss and metrics as `exit_loss_from_hidden`, never holding more than one chunk
    of logits (two with `distill`: the exit's and the teacher's; see chunked_loss.py)."""
    m = mask.astype(jnp.float32)
    count = m.sum()
    kw = dict(chunk_tokens=chunk_tokens, distill=bool(distill))
    if recompute:
        _, ce, z, kl = chunked_exit_sums(config, params, hidden, targets, m, exits, **kw)
        return combine_exit_losses(config, exits, ce, count, z, z_loss, weights, kl, distill)
    coef = exit_weights(config, exits, weights) / jnp.maximum(count, 1.0)
    zcoef = coef * z_loss if z_loss else jnp.zeros_like(coef)
    loss, ce, z, kl = chunked_exit_sums(config, params, hidden, targets, m, exits, coef=coef,
                                        zcoef=zcoef, kcoef=coef * distill, **kw)
    _, metrics = combine_exit_losses(config, exits, ce, count, z, z_loss, weights, kl, distill)
    return loss, metrics


def loss_fn(config: LlamaConfig, params, batch: dict, exits: tuple[int, ...] | None = None,
            z_loss: float = 0.0, impl: str = "auto", chunk_tokens: int | None = None,
            weights=None, distill: float = 0.0, keep=None) -> tuple[Array, dict]:
    """The multi-exit training loss for one batch (not jitted; call inside your step).

    `impl`: "auto" | "plain" | "chunked" | "chunked_recompute" (see the module docstring);
    `chunk_tokens`: tokens per chunk of the chunked loss (default: `default_chunk_tokens`);
    `weights`: per-exit weights overriding the config's (may be traced); `distill`: the
    factor of the KL-to-the-last-exit term; `keep`: a layer-dropout mask [layers, batch].
    """
    exits = with_last(config, exits)
    targets, mask = batch_targets(batch)
    hidden = exit_hidden_states(config, params, jnp.asarray(batch["input_ids"], jnp.int32),
                                batch.get("positions"), batch.get("segment_ids"), exits, keep)
    impl = resolve_loss_impl(impl, len(exits), targets.size, chunk_tokens, config.vocab_size)
    if impl == "plain":
        return exit_loss_from_hidden(config, params, hidden, targets, mask, exits, z_loss,
                                     weights, distill)
    return chunked_exit_loss_from_hidden(config, params, hidden, targets, mask, exits, z_loss,
                                         chunk_tokens, recompute=impl == "chunked_recompute",
                                         weights=weights, distill=distill)


@partial(jax.jit, static_argnames=("config", "exits"))
def _exit_loss(config, params, batch, exits):
    return loss_fn(config, params, batch, exits)


def exit_loss(config: LlamaConfig, params, batch: dict,
              exits: tuple[int, ...] | None = None) -> tuple[Array, dict]:
    """(loss, metrics): the weighted mean of per-exit token-mean CEs, with `loss/exit_N` metrics."""
    exits = with_last(config, exits)
    batch = {k: v for k, v in batch.items() if v is not None}
    check_batch(config, batch)
    return _exit_loss(config, params, batch, exits)
