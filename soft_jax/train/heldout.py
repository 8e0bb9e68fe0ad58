"""Per-exit held-out metrics: token-mean cross-entropy, perplexity and next-token accuracy."""

from __future__ import annotations

from functools import partial
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from soft_jax.model.config import LlamaConfig
from soft_jax.model.exits import with_last
from soft_jax.train.loss import batch_targets, check_batch, token_cross_entropy
from soft_jax.model.transformer import exit_hidden_states, head_logits


@partial(jax.jit, static_argnames=("config", "exits"))
def _exit_sums(config, params, batch, exits):
    targets, mask = batch_targets(batch)
    hidden = exit_hidden_states(config, params, batch["input_ids"], batch.get("positions"),
                                batch.get("segment_ids"), exits)
    m = mask.astype(jnp.float32)
    ce, correct = [], []
    for i, e in enumerate(exits):
        logits = head_logits(config, params, hidden[i], e)
        ce.append(jnp.sum(token_cross_entropy(logits, targets)[0] * m))
        correct.append(jnp.sum((jnp.argmax(logits, -1) == targets) * m))
    return jnp.stack(ce), jnp.stack(correct), m.sum()


def per_exit_metrics(config: LlamaConfig, params, batches: Iterable[dict],
                     exits: tuple[int, ...] | None = None) -> dict[int, dict[str, float]]:
    """{exit: {"loss", "ppl", "accuracy", "tokens"}} over all target tokens of `batches`."""
    exits = with_last(config, exits)
    ce = np.zeros(len(exits))
    correct = np.zeros(len(exits))
    count = 0.0
    for batch in batches:
        check_batch(config, {k: v for k, v in batch.items() if v is not None})
        b = {k: jnp.asarray(v) for k, v in batch.items() if v is not None}
        c, a, n = jax.device_get(_exit_sums(config, params, b, exits))
        ce, correct, count = ce + c, correct + a, count + float(n)
    denom = max(count, 1.0)
    return {e: {"loss": float(ce[i] / denom), "ppl": float(np.exp(ce[i] / denom)),
                "accuracy": float(correct[i] / denom), "tokens": int(count)}
            for i, e in enumerate(exits)}
