"""Self-speculative decoding: draft K tokens with sub-model n, verify with the full model.

The draft is a prefix of the full model, so drafting already wrote the KV of layers 1..n for
the drafted positions and kept their layer-n states; verification runs only layers n+1..L
on those K+1 states in one call (LayerSkip). Rejected positions are rolled back by moving the
cache length back (decode.py masks everything beyond it). The whole generation (drafting,
verification, acceptance, adaptive K, stop tokens) is one `lax.while_loop` on device: the
host sees the result once, not once per round.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soft_jax.model.config import LlamaConfig
from soft_jax.infer.engine import (Cache, Decoding, exit_head, filter_logits, for_decoding, forward,
                             prefill_prompts, run_layers, sample)
from soft_jax.model.exits import head_index
from soft_jax.model.transformer import head_logits

Array = jax.Array
START_K, MAX_K = 4, 15  # adaptive draft length: the paper's start; the cap bounds the cache


def verify_rows(k: int) -> int:
    """Rows of the verify call for k drafts: k + 1 rounded up to a power of two, so adaptive K
    needs only a few static-shape verify branches (a switch in one program); the extra rows are scratch past the cache length (in the
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


class SpecState(NamedTuple):
    """The carry of the on-device speculation loop."""

    cache: Cache
    last: Array  # the last emitted token, fed at slot n_ctx in the next round
    n_ctx: Array
    out: Array  # [capacity + rows] emitted tokens (valid up to n_out)
    n_out: Array
    cur_k: Array
    done: Array
    rounds: Array
    drafted: Array
    accepted: Array
    lengths: Array  # [capacity] draft length of each round


def _draft(config, params, cache, last, n_ctx, s: Decoding, draft_exit, head_idx, k, u, rows):
    """Draft k tokens after `last` with the sub-model; step k only runs the last draft through
    layers 1..n for the verifier. Returns (cache, layer-n states [rows, D], drafts [rows - 1],
    draft logits [rows - 1, V] (filtered; a dummy column if greedy))."""
    pad = jnp.zeros((1,), jnp.int32)

    def step(i, c):
        cache, tok, hs, drafts, qs = c
        h, cache = forward(config, params, tok[None, None], cache, pad, n_ctx + i, draft_exit)
        hs = hs.at[i].set(h[0, 0])

        def propose(_):
            q = exit_head(config, params, h[:, 0], head_idx)[0]
            if s.greedy:
                d = jnp.argmax(q).astype(jnp.int32)
                return d, drafts.at[i].set(d), qs
            q = filter_logits(q, s)
            d = sample(jax.nn.softmax(q), u[i])
            return d, drafts.at[i].set(d), qs.at[i].set(q)

        tok, drafts, qs = jax.lax.cond(i < k, propose, lambda _: (tok, drafts, qs), None)
        return cache, tok, hs, drafts, qs

    init = (cache, last, jnp.zeros((rows, config.hidden_size), config.compute_dtype),
            jnp.zeros((rows - 1,), jnp.int32),
            jnp.zeros((rows - 1, 1 if s.greedy else config.vocab_size), jnp.float32))
    cache, _, hs, drafts, qs = jax.lax.fori_loop(0, k + 1, step, init)
    return cache, hs, drafts, qs


def _verify(config, params, cache, hs, drafts, qs, u, n_ctx, s: Decoding, draft_exit, k, rows):
    """Layers n+1..L on the first `rows` (static) draft states, the full head, accept/resample:
    (accepted count m, next token, cache)."""
    h, cache = run_layers(config, params, hs[None, :rows], cache, jnp.zeros((1,), jnp.int32),
                          n_ctx, draft_exit, config.num_layers)
    p = head_logits(config, params, h[0], config.num_layers)
    p = p if s.greedy else filter_logits(p, s)
    m, nxt = accept_drafts(None if s.greedy else u[:rows], drafts[:rows - 1], qs[:rows - 1], p,
                           k, s.greedy)
    return m, nxt, cache


def spec_round(config: LlamaConfig, params: dict, st: SpecState, draft_exit: Array,
               head_idx: Array, max_k: int, adaptive: bool, s: Decoding) -> SpecState:
    """One round: draft K = min(cur_k, max_new - emitted - 1) >= 1 tokens, verify them in
    one call whose row count verify_rows(K) picks one of a few static-shape branches, and
    append the accepted drafts and the next token (adaptive: cur_k +2 when all were accepted,
    else -1, within 1..max_k); `done` after a stop id or s.max_new tokens."""
    rows = verify_rows(max_k)
    sizes = [1 << j for j in range(1, rows.bit_length())]  # verify_rows of K = 1..max_k
    max_new = s.max_new
    k = jnp.clip(jnp.minimum(st.cur_k, max_new - st.n_out - 1), 1, max_k)
    # rows - 1 draft samples, then up to rows - 1 acceptance tests and one resample
    u = None if s.greedy else jax.random.uniform(jax.random.fold_in(s.key(), st.n_ctx),
                                               (2 * rows - 1,))
    cache, hs, drafts, qs = _draft(config, params, st.cache, st.last, st.n_ctx, s,
                                   draft_exit, head_idx, k, u, rows)
    u_acc = None if s.greedy else u[rows - 1:]
    branches = [partial(_verify, config, params, rows=r) for r in sizes]
    branch = 31 - jax.lax.clz(k)  # k.bit_length() - 1: index of verify_rows(k) in sizes
    m, nxt, cache = jax.lax.switch(branch, branches, cache, hs, drafts, qs, u_acc, st.n_ctx,
                                   s, draft_exit, k)
    seq = jnp.concatenate([drafts, jnp.zeros((1,), jnp.int32)]).at[m].set(nxt)
    stops = jnp.isin(seq, s.stop_array()) & (jnp.arange(rows) <= m)
    emit = jnp.minimum(jnp.where(jnp.any(stops), jnp.argmax(stops), m) + 1,
                       max_new - st.n_out)
    n_out = st.n_out + emit
    cur_k = (jnp.where(m == k, jnp.minimum(max_k, st.cur_k + 2), jnp.maximum(1, st.cur_k - 1))
             if adaptive else st.cur_k)
    return SpecState(cache, nxt, st.n_ctx + m + 1,
                     jax.lax.dynamic_update_slice(st.out, seq, (st.n_out,)), n_out, cur_k,
                     jnp.any(stops) | (n_out >= max_new), st.rounds + 1, st.drafted + k,
                     st.accepted + m, st.lengths.at[st.rounds].set(k))


def spec_start(cache: Cache, last: Array, n_ctx: Array, k0: Array, max_k: int,
               s: Decoding) -> SpecState:
    """The state before the first round: `last` (the prompt's last token) at slot n_ctx."""
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  distinct buffers: the state is donated
    return SpecState(cache, last, n_ctx, jnp.zeros((s.capacity + verify_rows(max_k),), jnp.int32),
                     zero(), k0, jnp.zeros((), bool), zero(), zero(), zero(),
                     jnp.zeros((s.capacity,), jnp.int32))


@partial(jax.jit, static_argnames=("config", "max_k", "adaptive"), donate_argnames=("cache",))
def spec_loop(config: LlamaConfig, params: dict, cache: Cache, last: Array, n_ctx: Array,
              draft_exit: Array, head_idx: Array, k0: Array, max_k: int, adaptive: bool,
              s: Decoding) -> SpecState:
    """Self-speculative decoding of one prompt, every round (spec_round) on device in one
    while loop; cur_k starts at k0."""
    round_ = partial(spec_round, config, params, draft_exit=draft_exit, head_idx=head_idx,
                     max_k=max_k, adaptive=adaptive, s=s)
    return jax.lax.while_loop(lambda st: ~st.done, round_,
                              spec_start(cache, last, n_ctx, k0, max_k, s))


def spec_stats(st: SpecState) -> tuple[list[int], dict]:
    """(emitted tokens, statistics) of a finished speculation state."""
    n_out, rounds, drafted, accepted = (int(x) for x in jax.device_get(
        (st.n_out, st.rounds, st.drafted, st.accepted)))
    stats = {"drafted": drafted, "accepted": accepted, "rejected": drafted - accepted,
             "rejection_ratio": (drafted - accepted) / drafted if drafted else 0.0,
             "acceptance_rate": accepted / drafted if drafted else 0.0, "rounds": rounds,
             "draft_lengths": np.asarray(st.lengths[:rounds]).tolist(),
             "tokens_per_round": n_out / rounds if rounds else 0.0}
    return np.asarray(st.out[:n_out]).tolist(), stats


_round_step = jax.jit(spec_round, static_argnames=("config", "max_k", "adaptive"),
                     donate_argnames=("st",))


def speculative_generate(config: LlamaConfig, params: dict, prompt: list[int], draft_exit: int,
                         k: int | None, s: Decoding,
                         host_loop: bool = False) -> tuple[list[int], dict]:
    """Generate for one prompt; `k=None` adapts K (start 4, +2 all accepted, else -1, min 1).
    `host_loop` drives the same rounds from the host, one call and one transfer per round
    (what spec_loop replaced; kept to measure against)."""
    max_k = k or MAX_K  # the cap applies to adaptive K only
    params = for_decoding(params)
    cache, last, _, n_ctx = prefill_prompts(config, params, [prompt],
                                            s.max_new + verify_rows(max_k))
    exit_args = (jnp.int32(draft_exit), jnp.int32(head_index(config, params, draft_exit)))
    k0 = jnp.int32(k or START_K)
    if not host_loop:
        return spec_stats(spec_loop(config, params, cache, last[0], n_ctx, *exit_args, k0,
                                    max_k, k is None, s))
    st = spec_start(cache, last[0], n_ctx, k0, max_k, s)
    while not bool(st.done):
        st = _round_step(config, params, st, *exit_args, max_k, k is None, s)
    return spec_stats(st)
