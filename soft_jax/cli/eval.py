"""`soft-jax eval`: evaluate every exit (or a chosen subset) of a model.

    soft-jax eval --config configs/eval/tiny_demo.py
    soft-jax eval --hf DIR --tasks loss,gsm8k --exits 8,16,32 --out runs/eval_x
    soft-jax eval --config configs/eval/tiny_demo.py --ckpt runs/tiny \\
        --second-ckpt runs/tiny_sft --config.gsm8k.max_examples=20

Flags override the config file; any field can be set with --config.FIELD=VALUE (tuples as
comma lists, e.g. --config.gsm8k.shots=0,4). Writes results.json, report.md, PNG figures and
per-example JSONL files into the output folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import ml_collections

from soft_jax.cli.flags import (add_allow_unverified, apply_overrides, command_parser, parse,
                                run_command)
from soft_jax.eval.config import TASKS, default_config
from soft_jax.io.checkpoint import CheckpointError

NAMED = (("tokenizer", "tokenizer"), ("exits", "exits"), ("tasks", "tasks"), ("out", "out_dir"),
         ("name", "name"), ("judge", "pairwise.judge"))  # flag -> config field


def build_parser():
    """The parser of `soft-jax eval`: named flags beside the config's fields."""
    p = command_parser("eval", __doc__, default_config)
    p.add_argument("--ckpt", help="soft_jax checkpoint, Orbax manager dir or training work dir")
    p.add_argument("--hf", help="Hugging Face folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--exits", help="comma-separated layer counts (default: the config's exits)")
    p.add_argument("--tasks", help=f"comma-separated, some of {','.join(TASKS)}")
    p.add_argument("--out", help="output folder")
    p.add_argument("--name", help="model label in tables and figures")
    p.add_argument("--second-ckpt", help="second model (pairwise / sortedness): checkpoint")
    p.add_argument("--second-hf", help="second model: Hugging Face folder")
    p.add_argument("--judge", help="pairwise judge: rouge-l | hf:FOLDER")
    add_allow_unverified(p)
    return p


def parse_args(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The eval config: `--config FILE` (or the defaults), then overrides, then named flags
    unless a `--config.FIELD` of the same field was given."""
    args, cfg = parse(build_parser(), argv)
    given = {a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")}
    for flag, (field, other) in {"ckpt": ("ckpt", "hf"), "hf": ("hf", "ckpt")}.items():
        if getattr(args, flag):
            cfg[field], cfg[other] = getattr(args, flag), ""
    for flag, (field, other) in {"second_ckpt": ("ckpt", "hf"),
                                 "second_hf": ("hf", "ckpt")}.items():
        if getattr(args, flag):
            cfg.second[field], cfg.second[other] = getattr(args, flag), ""
    if args.allow_unverified:
        cfg.allow_unverified = True
    named = [f"--config.{field}={getattr(args, flag)}" for flag, field in NAMED
             if getattr(args, flag) is not None and field not in given]
    return apply_overrides(cfg, named)


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax eval ...`; returns the exit status."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from soft_jax.eval.runner import run_eval

    argv = list(sys.argv[1:] if argv is None else argv)

    def evaluate() -> int:
        run_eval(parse_args(argv))
        return 0

    return run_command(evaluate, argv, (CheckpointError,))
