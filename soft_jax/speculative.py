"""Self-speculative decoding: draft K tokens with sub-model n, verify with the full model.

The draft is a prefix of the full model, so drafting already wrote the KV of layers 1..n for
the drafted positions and kept their layer-n states; verification runs only layers n+1..L
on those K+1 states in one call (LayerSkip). Rejected positions are rolled back by moving the
cache length back (decode.py masks everything beyond it).
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from soft_jax.config import LlamaConfig
from soft_jax.decode import (Cache, Sampling, cache_slots, exit_head, filter_logits, forward,
                             head_index, prefill, run_layers, sample)
from soft_jax.model import head_logits

Array = jax.Array
START_K, MAX_K = 4, 15  # adaptive draft length: the paper's start; the cap bounds the cache


def verify_rows(k: int) -> int:
    """Rows of the verify call for k drafts: k + 1 rounded up to a power of two, so adaptive K
    compiles at most four programs; the extra rows are scratch past the cache length (in the
    memory-bound decode regime a few extra rows cost next to nothing)."""
    return 1 << k.bit_length()


def accept_drafts(u: Array, drafts: Array, q_logits: Array, p_logits: Array, k: Array,
                  greedy: bool) -> tuple[Array, Array]:
    """(accepted count m, next token) for the first k of drafts [R-1], draft logits [R-1, V]
    and full-model logits [R, V] (logits already filtered: temperature, top-k, top-p), with
    uniforms u [R] (one per acceptance test, the last for the resample; unused if greedy).

    Greedy: the longest prefix equal to the full model's argmax, then its argmax. Sampling
    (Leviathan et al. / Chen et al.): accept draft i with probability min(1, p_i/q_i); at the
    first rejection resample from norm(max(p - q, 0)); if all pass, sample the bonus from p_k.
    """
    valid = jnp.arange(drafts.shape[0]) < k
    if greedy:
        ok = (drafts == jnp.argmax(p_logits[:-1], axis=-1)) & valid
        m = jnp.sum(jnp.cumprod(ok))
        return m, jnp.argmax(p_logits[m]).astype(jnp.int32)
    p = jax.nn.softmax(p_logits, axis=-1)
    q = jnp.where(valid[:, None], jax.nn.softmax(q_logits, axis=-1), 0.0)
    rows = jnp.arange(drafts.shape[0])
    ok = (u[:-1] * q[rows, drafts] < p[rows, drafts]) & valid
    m = jnp.sum(jnp.cumprod(ok))
    # q's rows from k on are zero, so after k acceptances the "residual" is exactly p_k (bonus).
    residual = jnp.maximum(p[m] - jnp.concatenate([q, jnp.zeros_like(q[:1])])[m], 0.0)
    return m, sample(jnp.where(residual.sum() > 0, residual, p[m]), u[-1])


@partial(jax.jit, static_argnames=("config", "rows", "greedy"), donate_argnames=("cache",))
def spec_round(config: LlamaConfig, params: dict, cache: Cache, last: Array, n_ctx: Array,
               key: Array, s: Sampling, draft_exit: Array, head_idx: Array, k: Array, rows: int,
               greedy: bool) -> tuple[Array, Cache]:
    """Draft k < rows tokens after `last` (at slot n_ctx) with exit draft_exit, verify, accept.

    Returns ([accepted count, next token, drafts...] as one int32 array [rows + 1], cache):
    one transfer to the host per round.
    """
    pad = jnp.zeros((1,), jnp.int32)
    # rows - 1 draft samples, then rows - 1 acceptance tests and one resample
    u = None if greedy else jax.random.uniform(jax.random.fold_in(key, n_ctx), (2 * rows - 1,))

    def draft(i, c):
        cache, tok, hs, drafts, qs = c
        h, cache = forward(config, params, tok[None, None], cache, pad, n_ctx + i, draft_exit)
        hs = hs.at[i].set(h[0, 0])

        def propose(_):
            q = exit_head(config, params, h[:, 0], head_idx)
            q = q if greedy else filter_logits(q, s)
            d = jnp.argmax(q[0]) if greedy else sample(jax.nn.softmax(q[0]), u[i])
            return d.astype(jnp.int32), drafts.at[i].set(d), qs.at[i].set(q[0])

        # Step k only runs the last draft through layers 1..n for the verifier (no head).
        tok, drafts, qs = jax.lax.cond(i < k, propose, lambda _: (tok, drafts, qs), None)
        return cache, tok, hs, drafts, qs

    init = (cache, last, jnp.zeros((rows, config.hidden_size), config.compute_dtype),
            jnp.zeros((rows - 1,), jnp.int32),
            jnp.zeros((rows - 1, config.vocab_size), jnp.float32))
    cache, _, hs, drafts, qs = jax.lax.fori_loop(0, k + 1, draft, init)
    h, cache = run_layers(config, params, hs[None], cache, pad, n_ctx, draft_exit,
                          config.num_layers)
    p = head_logits(config, params, h[0], config.num_layers)
    p = p if greedy else filter_logits(p, s)
    m, nxt = accept_drafts(None if greedy else u[rows - 1:], drafts, qs, p, k, greedy)
    return jnp.concatenate([jnp.stack([m, nxt]).astype(jnp.int32), drafts]), cache


def speculative_generate(config: LlamaConfig, params: dict, prompt: list[int], max_new: int,
                         draft_exit: int, k: int | None, s: Sampling, greedy: bool,
                         stop_ids: set[int], seed: int) -> tuple[list[int], dict]:
    """Generate for one prompt; `k=None` adapts K (start 4, +2 all accepted, else -1, min 1)."""
    max_k = k or MAX_K  # the cap applies to adaptive K only
    slots = cache_slots(len(prompt) + max_new + verify_rows(max_k))
    key, head_idx = jax.random.PRNGKey(seed), np.int32(head_index(config, params, draft_exit))
    t0 = time.perf_counter()
    cache = prefill(config, params, jnp.asarray([prompt[:-1]], jnp.int32),
                    jnp.zeros((1,), jnp.int32), slots)
    out, n_ctx, cur_k = [], len(prompt) - 1, k or START_K
    drafted = accepted = rounds = 0
    lengths = []
    while len(out) < max_new and not (out and out[-1] in stop_ids):
        kk = max(1, min(cur_k, max_k, max_new - len(out) - 1))  # no drafts past max_new
        res, cache = spec_round(config, params, cache, np.int32(out[-1] if out else prompt[-1]),
                                np.int32(n_ctx), key, s, np.int32(draft_exit), head_idx,
                                np.int32(kk), verify_rows(kk), greedy)
        res = np.asarray(res).tolist()
        m, nxt, drafts = res[0], res[1], res[2:]
        rounds += 1
        lengths.append(kk)
        drafted, accepted, n_ctx = drafted + kk, accepted + m, n_ctx + m + 1
        for t in drafts[:m] + [nxt]:
            out.append(t)
            if t in stop_ids or len(out) == max_new:
                break
        if k is None:
            cur_k = min(MAX_K, cur_k + 2) if m == kk else max(1, cur_k - 1)
    stats = {"drafted": drafted, "accepted": accepted, "rejected": drafted - accepted,
             "rejection_ratio": (drafted - accepted) / drafted if drafted else 0.0,
             "acceptance_rate": accepted / drafted if drafted else 0.0, "rounds": rounds,
             "draft_lengths": lengths,
             "tokens_per_round": len(out) / rounds if rounds else 0.0,
             "time_s": time.perf_counter() - t0}
    return out, stats
