"""The one flag parser every `soft-jax` subcommand uses.

- `command_parser(name, doc)`: an argparse parser named `soft-jax NAME`, with `--debug`.
- `add_config(parser, defaults)`: `--config FILE` plus any `--config.a.b=value` override of
  the config's fields, which `--help` lists with their defaults; `parse(parser, argv)` then
  returns (args, config).
- `run_command(fn, debug)`: the one-line `error: ...` (exit 2) that bad input gets, and the
  one line (exit 130) that Ctrl-C gets.

Overrides are applied by ml_collections' config flags: each value is parsed by the type of
the field's default (int, float, bool, str, tuple). Tuple fields also take bare comma lists
(`--config.tasks=loss,gsm8k`) and `''` for empty; repeating a tuple flag appends (the
library's rule). Errors are one-line ValueErrors that name the field.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path, tuple_parser

from soft_jax.utils.config_file import load_config_file

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
DEBUG_ENV = "SOFT_JAX_DEBUG"  # =1: full tracebacks instead of one-line errors
# Bad input: one line and exit 2. Each wing's errors derive from one of these; OSError covers
# every path that is missing, in the way, unreadable or unwritable (read-only file systems too).
INPUT_ERRORS = (ValueError, KeyError, OSError)
INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT (128 + 2)
INTERRUPTED_MESSAGE = "interrupted (Ctrl-C); outputs are written whole or not at all"


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
        raise ValueError(str(e).splitlines()[0]) from None
    if rest:
        raise ValueError(f"unrecognized argument {rest[0]!r}")
    return values["config"].value


def _field_lines(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(cfg.keys()):
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            lines += _field_lines(value, f"{prefix}{key}.")
        else:
            lines.append(f"  --config.{prefix}{key}={value!r}")
    return lines


class _ConfigParser(argparse.ArgumentParser):
    """An ArgumentParser whose `--config.*` arguments are config overrides, not flags."""

    def __init__(self, *args, defaults: Callable[[], ml_collections.ConfigDict], **kw):
        super().__init__(*args, **kw)
        self.config_defaults = defaults

    def format_help(self) -> str:
        fields = "\n".join(_field_lines(self.config_defaults()))
        return (f"{super().format_help()}\nconfig fields (--config.FIELD=VALUE overrides the "
                f"config file; shown with their defaults):\n{fields}\n")


def command_parser(name: str, doc: str, defaults: Callable[[], ml_collections.ConfigDict]
                   | None = None, default_file: str | None = None,
                   config_required: bool = False) -> argparse.ArgumentParser:
    """The parser of `soft-jax NAME`: `doc` as its help, `--debug`, and with `defaults` (a
    config schema) `--config FILE` (required, or default `default_file`, else the schema's
    defaults) plus `--config.FIELD=VALUE` overrides of its fields."""
    kw = dict(prog=f"soft-jax {name}", description=doc,
              formatter_class=argparse.RawDescriptionHelpFormatter)
    p = _ConfigParser(defaults=defaults, **kw) if defaults else argparse.ArgumentParser(**kw)
    p.add_argument("--debug", action="store_true",
                   help=f"full tracebacks instead of one-line errors (or {DEBUG_ENV}=1)")
    if defaults:
        fallback = "required" if config_required else f"default: {default_file or 'the schema'}"
        p.add_argument("--config", metavar="FILE", default=default_file,
                       help=f"config file (a .py with get_config()); {fallback}")
    return p


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
          config_file: Callable[[str], ml_collections.ConfigDict] = load_config_file
          ) -> tuple[argparse.Namespace, ml_collections.ConfigDict | None]:
    """(args, config) of `argv`: the config file (or the schema's defaults) with every
    `--config.FIELD=VALUE` applied; config is None for a parser without a config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not isinstance(parser, _ConfigParser):
        return parser.parse_args(argv), None
    args, rest = parser.parse_known_args(argv)
    cfg = config_file(args.config) if args.config else parser.config_defaults()
    return args, apply_overrides(cfg, rest)


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """The required `--ckpt CKPT | --hf DIR` pair every model-loading command takes."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="soft_jax checkpoint or training work dir")
    src.add_argument("--hf", help="Hugging Face folder (or hub name)")


def add_allow_unverified(parser: argparse.ArgumentParser) -> None:
    """`--allow-unverified`: load a checkpoint step that has no integrity record."""
    parser.add_argument("--allow-unverified", action="store_true",
                        help="load a checkpoint without an integrity record (by default such a "
                             "step is skipped for the previous verified one, or refused)")


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """Whether `--debug` in argv or SOFT_JAX_DEBUG asks for tracebacks."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def report_error(e: BaseException, code: int = 2) -> int:
    """Print the `error: ...` line bad input gets and return its exit status (2); with
    SOFT_JAX_DEBUG=1 the exception propagates (its traceback) instead."""
    if debug_requested():
        raise e
    print(f"error: {first_line(e)}", file=sys.stderr, flush=True)
    return code


def run_command(fn: Callable[[], object], argv: Sequence[str] | None = None,
                errors: tuple[type[BaseException], ...] = ()):
    """`fn()`'s result (an exit status, or a summary that `soft-jax` reads as 0), or exit
    status 2 after one line for bad input (INPUT_ERRORS and `errors`), or 130 after one line
    for Ctrl-C; `--debug` in `argv` lets the traceback through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = fn()
    except (*INPUT_ERRORS, *errors) as e:
        if debug_requested(argv):
            raise
        return report_error(e)
    except KeyboardInterrupt:
        if debug_requested(argv):
            raise
        print(f"error: {INTERRUPTED_MESSAGE}", file=sys.stderr, flush=True)
        return INTERRUPTED
    return result


def comma_ints(text: str | None) -> tuple[int, ...] | None:
    """`8,12,16` as (8, 12, 16); None or '' as None."""
    return tuple(int(e) for e in text.split(",")) if text else None
