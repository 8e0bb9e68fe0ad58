"""Sorted-ness analysis: how close each exit's next-token distribution and normed hidden
state are to a reference exit's, at response positions 0..P-1.

Sequences are teacher-forced: every model reads the same tokens, prompt + a shared response.
Response position k is the next-token distribution at input index `prompt_len - 1 + k`, i.e.
the one that predicts response token k. For each (exit, position):

  KL  = KL(p_ref || p_exit) = sum_v p_ref(v) * (log p_ref(v) - log p_exit(v))   (nats)
  cos = cosine(norm(h_exit), norm(h_ref)),  norm = the model's final RMSNorm (the vector
        that goes into the LM head)

averaged over the sequences whose response reaches position k (`count` says how many).
The reference is the last layer of the same model, or another model's last layer (SoFT exits
vs SFT's last layer and the reverse); the two must share the vocabulary (and hidden size for
the cosine).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from soft_jax.model.config import LlamaConfig
from soft_jax.model.layer_counts import normalize_exits
from soft_jax.model.layers import rms_norm
from soft_jax.model.transformer import exit_hidden_states, head_logits


@partial(jax.jit, static_argnames=("config", "exits", "positions"))
def _views(config, params, input_ids, starts, exits, positions):
    """(log-probs [E, B, P, V], normed hidden [E, B, P, D]) at `starts + 0..P-1`."""
    all_exits = normalize_exits(exits, config.num_layers)
    hs = exit_hidden_states(config, params, input_ids, exits=all_exits)
    idx = starts[:, None] + jnp.arange(positions)[None, :]  # [B, P]
    idx = jnp.clip(idx, 0, input_ids.shape[1] - 1)
    logps, normed = [], []
    for e in exits:
        h = hs[all_exits.index(e)]
        h = jnp.take_along_axis(h, idx[:, :, None], axis=1)
        x = rms_norm(h, params["final_norm"]["scale"].astype(h.dtype), config.rms_norm_eps)
        normed.append(x.astype(jnp.float32))
        logps.append(jax.nn.log_softmax(head_logits(config, params, h, e), axis=-1))
    return jnp.stack(logps), jnp.stack(normed)


def exit_views(config: LlamaConfig, params, input_ids, starts, exits, positions: int):
    """Public wrapper of the per-exit log-probs and normed hidden states at response
    positions (see the module doc); `starts` = prompt_len - 1 per row."""
    exits = tuple(int(e) for e in exits)
    return _views(config, params, jnp.asarray(input_ids, jnp.int32),
                  jnp.asarray(starts, jnp.int32), exits, int(positions))


def _kl(logp_ref, logp):  # [..., V]
    p = jnp.exp(logp_ref)
    return jnp.sum(jnp.where(p > 0, p * (logp_ref - logp), 0.0), axis=-1)


def _cos(a, b):
    num = jnp.sum(a * b, -1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return num / jnp.maximum(den, 1e-12)


def pad_sequences(seqs: list[tuple[list[int], int]], positions: int, pad_id: int = 0):
    """Right-pad (ids, prompt_len) pairs to one array (causal attention makes right padding
    harmless). Returns (ids [B, T], starts [B], valid [B, P]) where valid marks positions
    that have a real response token to predict."""
    if not seqs:
        raise ValueError("sortedness: no sequences to analyse")
    t = max(len(ids) for ids, _ in seqs)
    ids = np.full((len(seqs), t), pad_id, np.int32)
    starts = np.zeros(len(seqs), np.int32)
    valid = np.zeros((len(seqs), positions), bool)
    for i, (s, p_len) in enumerate(seqs):
        if p_len < 1 or p_len >= len(s):
            raise ValueError(f"sortedness: sequence {i} has prompt length {p_len} and "
                             f"{len(s)} tokens; it needs at least one response token")
        ids[i, :len(s)] = s
        starts[i] = p_len - 1
        valid[i, :min(positions, len(s) - p_len)] = True
    return ids, starts, valid


def compare_exits(config: LlamaConfig, params, seqs, exits, positions: int = 20,
                  ref: tuple | None = None, batch_size: int = 8, pad_id: int = 0) -> dict:
    """KL / cosine of each exit of (config, params) against a reference, per position.

    `ref` = None: this model's last layer; or (ref_config, ref_params, ref_exit) for another
    model. Returns {"exits", "positions", "kl" [E][P], "cos" [E][P] (None when hidden sizes
    differ), "count" [P]} with NaN where no sequence reaches a position.
    """
    exits = tuple(int(e) for e in exits)
    if ref is None:
        ref_config, ref_params, ref_exit = config, params, config.num_layers
    else:
        ref_config, ref_params, ref_exit = ref
        if ref_config.vocab_size != config.vocab_size:
            raise ValueError(f"sortedness: the two models' vocabularies differ "
                             f"({config.vocab_size} vs {ref_config.vocab_size} tokens)")
    same_width = ref_config.hidden_size == config.hidden_size
    ids, starts, valid = pad_sequences(seqs, positions, pad_id)
    kl_sum = np.zeros((len(exits), positions))
    cos_sum = np.zeros((len(exits), positions))
    count = np.zeros(positions)
    for s in range(0, len(ids), batch_size):
        sl = slice(s, s + batch_size)
        b_ids, b_starts, b_valid = ids[sl], starts[sl], valid[sl]
        if len(b_ids) < batch_size and len(ids) > batch_size:  # keep one compiled shape
            extra = batch_size - len(b_ids)
            b_ids = np.concatenate([b_ids, np.repeat(b_ids[-1:], extra, 0)])
            b_starts = np.concatenate([b_starts, np.repeat(b_starts[-1:], extra)])
            b_valid = np.concatenate([b_valid, np.zeros((extra, positions), bool)])
        logp, normed = exit_views(config, params, b_ids, b_starts, exits, positions)
        if ref is None:
            i = exits.index(ref_exit) if ref_exit in exits else None
            if i is None:
                r_logp, r_normed = exit_views(config, params, b_ids, b_starts, (ref_exit,),
                                              positions)
            else:
                r_logp, r_normed = logp[i:i + 1], normed[i:i + 1]
        else:
            r_logp, r_normed = exit_views(ref_config, ref_params, b_ids, b_starts, (ref_exit,),
                                          positions)
        m = jnp.asarray(b_valid, jnp.float32)
        kl_sum += np.asarray(jnp.sum(_kl(r_logp, logp) * m, axis=1))
        if same_width:
            cos_sum += np.asarray(jnp.sum(_cos(normed, r_normed) * m, axis=1))
        count += b_valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        kl = np.where(count > 0, kl_sum / np.maximum(count, 1), np.nan)
        cos = np.where(count > 0, cos_sum / np.maximum(count, 1), np.nan)
    return {"exits": list(exits), "positions": positions,
            "reference_exit": int(ref_exit), "kl": kl.tolist(),
            "cos": cos.tolist() if same_width else None, "count": count.astype(int).tolist()}
