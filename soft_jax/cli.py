"""What every CLI shares: `--config.a.b=value` overrides (applied by ml_collections' config
flags), the `--ckpt | --hf` model source, one-line errors, comma lists of ints.

Each value is parsed by the type of the field's default (int, float, bool, str, tuple).
Tuple fields also take bare comma lists (`--config.tasks=loss,gsm8k`) and `''` for empty;
repeating a tuple flag appends (the library's rule). Errors are one-line ValueErrors that
name the field.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path, tuple_parser

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
DEBUG_ENV = "SOFT_JAX_DEBUG"  # =1: full tracebacks instead of one-line errors


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class CommaTupleParser(tuple_parser.TupleParser):
    """The library's tuple parser, plus `a,b` of bare words (`loss,gsm8k`) and '' as ()."""

    def parse(self, argument):
        if isinstance(argument, str) and not argument.strip():
            return ()
        if isinstance(argument, str) and "," in argument and isinstance(
                _literal(argument), str):
            return tuple(_literal(p.strip()) for p in argument.strip("()[] ").split(",")
                         if p.strip())
        return super().parse(argument)


# The library picks a field's parser from this process-wide table (its public hook).
config_flags.register_flag_parser_for_type(tuple, CommaTupleParser())


def apply_overrides(cfg: ml_collections.ConfigDict,
                    args: Sequence[str]) -> ml_collections.ConfigDict:
    """`cfg` with `--config.a.b=value` / `--config.a.b value` args applied (in place)."""
    for arg in args:
        m = _OVERRIDE.match(arg)
        if m is None:
            continue
        try:
            config_path.get_value(m.group(1), cfg)
        except (KeyError, AttributeError, TypeError, IndexError):
            raise ValueError(f"unknown config field config.{m.group(1)}") from None
    argv = ["", *args]
    values = flags.FlagValues()  # fresh per call: no global absl state, re-entrant main()
    try:
        config_flags.DEFINE_config_dict("config", cfg, flag_values=values, sys_argv=argv,
                                        lock_config=False)
        rest = values(argv)[1:]
    except flags.Error as e:
        raise ValueError(str(e)) from None
    if rest:
        raise ValueError(f"unrecognized argument {rest[0]!r}")
    return values["config"].value


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """The required `--ckpt CKPT | --hf DIR` pair every model-loading CLI takes."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="soft_jax checkpoint or training work dir")
    src.add_argument("--hf", help="Hugging Face LlamaForCausalLM folder")


def debug_requested() -> bool:
    """Whether SOFT_JAX_DEBUG asks for tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report_error(e: BaseException) -> int:
    """The `error: ...` line every CLI prints for bad input, and its exit status 2; with
    SOFT_JAX_DEBUG=1 the exception propagates (its traceback) instead."""
    if debug_requested():
        raise e
    print(f"error: {e}", file=sys.stderr)
    return 2


def comma_ints(text: str | None) -> tuple[int, ...] | None:
    """`8,12,16` as (8, 12, 16); None or '' as None."""
    return tuple(int(e) for e in text.split(",")) if text else None
