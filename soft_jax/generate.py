"""Command line for text generation (the implementation is soft_jax.generation).

    python -m soft_jax.generate (--ckpt CKPT | --hf DIR) (--prompt TEXT | --prompt-ids 1,2,3)
        [--exit N | --draft-exit N [--draft-tokens K] | --dynamic [--thresholds 8:0.9,16:0.8]]
        [--max-new-tokens 64] [--temperature T --top-k K --top-p P --seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
import types

from soft_jax.cli import add_model_source, comma_ints, report_error
from soft_jax.generation import Generation, generate, stop_set  # noqa: F401  (re-exported)


class _CallableModule(types.ModuleType):
    """Importing this module makes Python bind it as the package attribute `soft_jax.generate`,
    in place of the generate() function the package exports; calling it keeps meaning the
    function, so `soft_jax.generate(config, params, ...)` works in either order."""

    def __call__(self, *args, **kwargs) -> Generation:
        return generate(*args, **kwargs)


if __name__ != "__main__":
    sys.modules[__name__].__class__ = _CallableModule


def _load(args):
    """(config, params, tokenizer or None) from --ckpt or --hf."""
    from soft_jax.loading import load_model

    return load_model(args.hf or args.ckpt, args.dtype if args.hf else None,
                      exits=comma_ints(args.exits))[:3]


def prompt_ids_for(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a text prompt: the tokenizer's own encoding (BOS etc.), or with `chat`
    the chat-template turn the fine-tuning data used (data.template='chat')."""
    if not chat:
        return tokenizer(text)["input_ids"]
    from soft_jax.data import chat_prompt, resolve_template

    resolve_template("chat", tokenizer)  # a clear error when there is no template
    return tokenizer.encode(chat_prompt(tokenizer, [{"role": "user", "content": text}]),
                            add_special_tokens=False)


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
    args = p.parse_args(argv)
    from soft_jax.checkpoint import CheckpointError

    try:
        config, params, tokenizer = _load(args)
        if args.chat and args.prompt is None:
            raise ValueError("--chat formats a --prompt text; it does not apply to --prompt-ids")
        if args.prompt is not None:
            if tokenizer is None:
                raise ValueError("no tokenizer files beside the weights; pass --prompt-ids")
            ids = prompt_ids_for(tokenizer, args.prompt, args.chat)
        else:
            ids = [int(t) for t in args.prompt_ids.split(",")]
        out = generate(config, params, ids, args.max_new_tokens, exit_layer=args.exit,
                       draft_exit=args.draft_exit, thresholds=_parse_thresholds(args.thresholds),
                       temperature=args.temperature, seed=args.seed, top_k=args.top_k,
                       top_p=args.top_p, draft_tokens=args.draft_tokens,
                       dynamic=args.dynamic, copy_kv=args.copy_kv, strict=args.strict)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        return report_error(e)
    toks = out.tokens[0]
    print(tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None
          else ",".join(map(str, toks)))
    stats = {k: v for k, v in out.stats.items() if k not in ("exits", "exit_confidences")}
    print(json.dumps({"tokens": toks, **stats}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
