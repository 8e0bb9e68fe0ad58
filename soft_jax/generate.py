"""Text generation with the full model, a sub-model, self-speculation or dynamic early exit.

    python -m soft_jax.generate (--ckpt CKPT | --hf DIR) (--prompt TEXT | --prompt-ids 1,2,3)
        [--exit N | --draft-exit N [--draft-tokens K] | --dynamic [--thresholds 8:0.9,16:0.8]]
        [--max-new-tokens 64] [--temperature T --top-k K --top-p P --seed S]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings

import jax.numpy as jnp
import numpy as np

from soft_jax.config import LlamaConfig
from soft_jax.decode import Decoding, decode_loop, head_index, prefill_prompts, trim
from soft_jax.dynamic import dynamic_generate
from soft_jax.speculative import speculative_generate

# soft_jax/__init__ exports generate(), so `python -m soft_jax.generate` finds this module
# already imported and runs a fresh copy as __main__: expected, and harmless here.
warnings.filterwarnings("ignore", message=r"'soft_jax\.generate' found in sys\.modules",
                        category=RuntimeWarning)


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


def _layer_count(config: LlamaConfig, name: str, value, last_ok: bool) -> int:
    n = config.num_layers
    hi = n if last_ok else n - 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= hi:
        why = "" if last_ok or value != n else " (the last layer is the verifier, not a draft)"
        raise ValueError(f"{name}={value!r} is not a layer count 1..{hi} of this {n}-layer "
                         f"model{why}")
    return int(value)


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
    `dynamic=True`: dynamic early exit (thresholds: see soft_jax.dynamic.resolve_thresholds;
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
        exit_layer = _layer_count(config, "exit_layer", exit_layer, last_ok=True)
    if draft_exit is not None:
        draft_exit = _layer_count(config, "draft_exit", draft_exit, last_ok=False)
    if draft_tokens is not None and (not isinstance(draft_tokens, int) or draft_tokens < 1):
        raise ValueError(f"draft_tokens={draft_tokens!r} must be a positive int (None = adaptive)")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got temperature="
                         f"{temperature}, top_k={top_k}, top_p={top_p}")
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


# --------------------------------------------------------------------------------- CLI
def _load(args):
    """(config, params, tokenizer or None) from --ckpt or --hf."""
    from pathlib import Path

    exits = tuple(int(e) for e in args.exits.split(",")) if args.exits else None
    if args.hf:
        from soft_jax.convert import load_hf

        config, params = load_hf(args.hf, args.dtype, exits)
        tok_dir = Path(args.hf)
    else:
        from soft_jax.checkpoint import load_params, tokenizer_dir_of

        config, params = load_params(args.ckpt)
        if exits is not None:
            config = config.replace(exits=exits)
        tok_dir = tokenizer_dir_of(args.ckpt)
    tokenizer = None
    if tok_dir is not None and any((tok_dir / f).is_file() for f in
                                   ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return config, params, tokenizer


def _parse_thresholds(text: str | None):
    if text is None:
        return None
    try:
        return {int(k): float(v) for k, v in (kv.split(":") for kv in text.split(","))}
    except ValueError:
        raise ValueError(f"--thresholds {text!r}: expected EXIT:PROB pairs like 8:0.9,12:0.8") \
            from None


def main(argv=None) -> int:
    """Entry point of `python -m soft_jax.generate`."""
    p = argparse.ArgumentParser(prog="python -m soft_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="soft_jax checkpoint or training work dir")
    src.add_argument("--hf", help="Hugging Face LlamaForCausalLM folder")
    prm = p.add_mutually_exclusive_group(required=True)
    prm.add_argument("--prompt", help="prompt text (needs a tokenizer beside the weights)")
    prm.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exit", type=int, default=None, help="decode with the N-layer sub-model")
    mode.add_argument("--draft-exit", type=int, default=None, help="self-speculative draft exit")
    mode.add_argument("--dynamic", action="store_true", help="per-token dynamic early exit")
    p.add_argument("--thresholds", default=None, help="dynamic: EXIT:PROB,... (default: paper's)")
    p.add_argument("--copy-kv", action="store_true", help="dynamic: CALM state copying")
    p.add_argument("--draft-tokens", type=int, default=None, help="fixed K (default adaptive)")
    p.add_argument("--exits", default=None, help="override the model's exits, e.g. 8,12,16")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="--hf parameter dtype")
    p.add_argument("--strict", action="store_true",
                   help="error (not a warning) past max_position_embeddings")
    args = p.parse_args(argv)
    from soft_jax.checkpoint import CheckpointError

    try:
        config, params, tokenizer = _load(args)
        if args.prompt is not None:
            if tokenizer is None:
                raise ValueError("no tokenizer files beside the weights; pass --prompt-ids")
            ids = tokenizer(args.prompt)["input_ids"]
        else:
            ids = [int(t) for t in args.prompt_ids.split(",")]
        out = generate(config, params, ids, args.max_new_tokens, exit_layer=args.exit,
                       draft_exit=args.draft_exit, thresholds=_parse_thresholds(args.thresholds),
                       temperature=args.temperature, seed=args.seed, top_k=args.top_k,
                       top_p=args.top_p, draft_tokens=args.draft_tokens,
                       dynamic=args.dynamic, copy_kv=args.copy_kv, strict=args.strict)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    toks = out.tokens[0]
    print(tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None
          else ",".join(map(str, toks)))
    stats = {k: v for k, v in out.stats.items() if k not in ("exits", "exit_confidences")}
    print(json.dumps({"tokens": toks, **stats}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
