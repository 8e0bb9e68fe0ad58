"""`soft-jax generate`: decode a prompt from a sub-model, self-speculatively, or with dynamic
early exit (the library function is `soft_jax.generate`).

    soft-jax generate (--ckpt CKPT | --hf DIR) (--prompt TEXT | --prompt-ids 1,2,3)
        [--exit N | --draft-exit N [--draft-tokens K] | --dynamic [--thresholds 8:0.9,16:0.8]]
        [--max-new-tokens 64] [--temperature T --top-k K --top-p P --seed S]
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from soft_jax.cli.flags import (add_allow_unverified, add_model_source, command_parser,
                                comma_ints, parse, run_command)
from soft_jax.data.formats import prompt_ids_for
from soft_jax.infer.generate import generate
from soft_jax.io.checkpoint import CheckpointError
from soft_jax.io.loading import load_model


def parse_thresholds(text: str | None) -> dict[int, float] | None:
    """`8:0.9,12:0.8` as {8: 0.9, 12: 0.8}; None as None."""
    if text is None:
        return None
    bad = ValueError(f"--thresholds {text!r}: expected EXIT:PROB pairs like 8:0.9,12:0.8, each "
                     "probability in [0, 1]")
    try:
        thresholds = {int(k): float(v) for k, v in (kv.split(":") for kv in text.split(","))}
    except ValueError:
        raise bad from None
    if not all(0 <= p <= 1 for p in thresholds.values()):  # nan fails too
        raise bad
    return thresholds


def build_parser():
    """The parser of `soft-jax generate`."""
    p = command_parser("generate", __doc__)
    add_model_source(p)
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
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user turn in the tokenizer's chat template")
    p.add_argument("--exits", default=None, help="override the model's exits, e.g. 8,12,16")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="--hf parameter dtype")
    p.add_argument("--strict", action="store_true",
                   help="error (not a warning) past max_position_embeddings")
    add_allow_unverified(p)
    return p


def run(args) -> int:
    """Load the model, decode, print the text (or ids) and a JSON line of stats."""
    config, params, tokenizer, _ = load_model(args.hf or args.ckpt,
                                              args.dtype if args.hf else None,
                                              exits=comma_ints(args.exits),
                                              allow_unverified=args.allow_unverified)
    if args.chat and args.prompt is None:
        raise ValueError("--chat formats a --prompt text; it does not apply to --prompt-ids")
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("no tokenizer files beside the weights; pass --prompt-ids")
        ids = prompt_ids_for(tokenizer, args.prompt, args.chat)
    else:
        ids = [int(t) for t in args.prompt_ids.split(",")]
    out = generate(config, params, ids, args.max_new_tokens, exit_layer=args.exit,
                   draft_exit=args.draft_exit, thresholds=parse_thresholds(args.thresholds),
                   temperature=args.temperature, seed=args.seed, top_k=args.top_k,
                   top_p=args.top_p, draft_tokens=args.draft_tokens,
                   dynamic=args.dynamic, copy_kv=args.copy_kv, strict=args.strict)
    toks = out.tokens[0]
    print(tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None
          else ",".join(map(str, toks)))
    stats = {k: v for k, v in out.stats.items() if k not in ("exits", "exit_confidences")}
    print(json.dumps({"tokens": toks, **stats}, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax generate ...`; returns the exit status."""
    args, _ = parse(build_parser(), argv)
    return run_command(lambda: run(args), argv, (CheckpointError,))
