"""Text generation with the full model, a sub-model, self-speculation or dynamic early exit:
`generate()` (exported as soft_jax.generate; its command is `soft-jax generate`)."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import jax.numpy as jnp
import numpy as np

from soft_jax.model.config import LlamaConfig
from soft_jax.infer.engine import Decoding, decode_loop, for_decoding, prefill_prompts, trim
from soft_jax.infer.dynamic import dynamic_generate
from soft_jax.model.exits import head_index
from soft_jax.model.layer_counts import layer_count
from soft_jax.infer.speculative import speculative_generate


@dataclasses.dataclass
class Generation:
    """Generated ids per prompt (prompt excluded, stop token kept) and decoding statistics."""

    tokens: list[list[int]]
    stats: dict


def _prompts(prompt_ids) -> list[list[int]]:
    arr = prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids
    if isinstance(arr, (list, tuple)) and arr and all(isinstance(t, (int, np.integer))
                                                      for t in arr):
        arr = [arr]
    if not isinstance(arr, (list, tuple)) or not arr or any(
            not isinstance(p, (list, tuple)) or not p for p in arr):
        raise ValueError("prompt_ids must be a non-empty list of ints, a list of non-empty "
                         "lists of ints, or a [batch, length] array")
    return [[int(t) for t in p] for p in arr]


def _check_ids(config: LlamaConfig, prompts: list[list[int]]) -> None:
    bad = [t for p in prompts for t in p if not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"prompt_ids {bad[:5]} are outside the vocabulary "
                         f"0..{config.vocab_size - 1}")


def stop_set(config: LlamaConfig, stop_tokens=None) -> set[int]:
    """The config's eos id(s) plus user stop tokens."""
    eos = config.eos_token_id
    ids = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    return ids | {int(t) for t in (stop_tokens or ())}


def _plain(config: LlamaConfig, params: dict, prompts: list[list[int]], layers: int,
           s: Decoding) -> tuple[list[list[int]], dict]:
    """Batched decoding with the sub-model of the first `layers` layers."""
    cache, last, pad, slot = prefill_prompts(config, params, prompts, s.max_new, layers)
    out, steps = decode_loop(config, params, cache, last, pad, slot, jnp.int32(layers),
                             jnp.int32(head_index(config, params, layers)), s)
    return [trim(row, s.stop_ids) for row in np.asarray(out)], {"steps": int(steps)}


def generate(config: LlamaConfig, params: dict, prompt_ids, max_new_tokens: int,
             exit_layer: int | None = None, draft_exit: int | None = None, thresholds=None,
             temperature: float = 0.0, seed: int = 0, *, top_k: int = 0, top_p: float = 1.0,
             stop_tokens=None, draft_tokens: int | None = None, dynamic: bool = False,
             copy_kv: bool = False, strict: bool = False) -> Generation:
    """Generate up to max_new_tokens ids per prompt (list of ints, list of lists, or array).

    Modes (pick one): plain decoding, batched with left padding, with the sub-model of the
    first `exit_layer` layers (default: the full model); `draft_exit=n`: self-speculative
    decoding with K = `draft_tokens` or adaptive (4, +2 / -1); `thresholds` or
    `dynamic=True`: dynamic early exit (thresholds: see soft_jax.infer.dynamic.resolve_thresholds;
    None = the paper's, mapped by relative depth), with `copy_kv=True` for CALM state copying
    instead of exact lazy catch-up. The last two take one prompt. temperature 0 is greedy;
    otherwise sampling with top_k (0 = off), top_p and seed (dynamic exits still compare the
    raw top-1 probability). Each row stops after the config's eos or any of stop_tokens (kept).
    A prompt + max_new_tokens beyond the config's max_position_embeddings warns (raises
    with `strict`). Returns Generation(tokens, stats); stats["time_s"] includes prefill and,
    on a first call, compilation.
    """
    prompts = _prompts(prompt_ids)
    _check_ids(config, prompts)
    dynamic = dynamic or thresholds is not None
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if sum(x is not None for x in (exit_layer, draft_exit)) + dynamic > 1:
        raise ValueError("choose one of exit_layer, draft_exit and thresholds/dynamic")
    if copy_kv and not dynamic:
        raise ValueError("copy_kv applies to dynamic decoding (thresholds or dynamic=True)")
    if exit_layer is not None:
        exit_layer = layer_count(exit_layer, config.num_layers, "exit_layer")
    if draft_exit is not None:
        draft_exit = layer_count(draft_exit, config.num_layers, "draft_exit",
                                 not_last="the last layer is the verifier, not a draft")
    if draft_tokens is not None and (not isinstance(draft_tokens, int) or draft_tokens < 1):
        raise ValueError(f"draft_tokens={draft_tokens!r} must be a positive int (None = adaptive)")
    if not 0 <= temperature < math.inf or top_k < 0 or not 0 < top_p <= 1:  # nan fails too
        raise ValueError(f"need a finite temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if (draft_exit is not None or dynamic) and len(prompts) != 1:
        raise ValueError(f"{'draft_exit' if draft_exit is not None else 'dynamic'} decoding "
                         f"supports one prompt at a time (as in the paper); got {len(prompts)}")
    if dynamic and not isinstance(thresholds, dict) and len(config.resolved_exits) < 2:
        raise ValueError(f"dynamic decoding needs exits, but this model records none besides "
                         f"its last layer {config.num_layers}; give them (--exits 2,4,... or "
                         "config.replace(exits=...)) or thresholds as {exit: prob}")
    longest = max(len(p) for p in prompts) + int(max_new_tokens)
    if longest > config.max_position_embeddings:
        msg = (f"prompt + max_new_tokens = {longest} tokens exceeds max_position_embeddings="
               f"{config.max_position_embeddings}; later positions were never trained")
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    s = Decoding(int(max_new_tokens), float(temperature), int(top_k), float(top_p),
                 tuple(sorted(stop_set(config, stop_tokens))), int(seed))
    t0 = time.perf_counter()
    params = for_decoding(params)
    if draft_exit is not None:
        toks, stats = speculative_generate(config, params, prompts[0], draft_exit, draft_tokens, s)
        tokens, mode = [toks], "speculative"
    elif dynamic:
        toks, stats = dynamic_generate(config, params, prompts[0], thresholds, s, copy_kv=copy_kv)
        tokens, mode = [toks], "dynamic"
    else:
        layers = exit_layer or config.num_layers
        tokens, stats = _plain(config, params, prompts, layers, s)
        mode = f"plain exit {layers}"
    elapsed, n = time.perf_counter() - t0, sum(len(t) for t in tokens)
    stats.update(mode=mode, time_s=elapsed, new_tokens=n,
                 tokens_per_s=n / elapsed if elapsed > 0 else float("inf"),
                 ms_per_token=1000 * elapsed / max(1, max(len(t) for t in tokens)))
    return Generation(tokens, stats)
