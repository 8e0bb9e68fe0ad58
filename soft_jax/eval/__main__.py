"""`python -m soft_jax.eval`: evaluate every exit (or a chosen subset) of a model.

    python -m soft_jax.eval --config configs/eval/tiny_demo.py
    python -m soft_jax.eval --hf DIR --tasks loss,gsm8k --exits 8,16,32 --out runs/eval_x
    python -m soft_jax.eval --config configs/eval/tiny_demo.py --ckpt runs/tiny \\
        --second-ckpt runs/tiny_sft --config.gsm8k.max_examples=20

Flags override the config file; any field can be set with --config.FIELD=VALUE (tuples as
comma lists, e.g. --config.gsm8k.shots=0,4). Writes results.json, report.md, PNG figures and
per-example JSONL files into the output folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import ml_collections

from soft_jax.cli import apply_overrides, report_error
from soft_jax.eval.config import TASKS, default_config
from soft_jax.train_config import load_config_file


def parse_args(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The eval config: `--config FILE` (or the defaults), then named flags, then overrides."""
    p = argparse.ArgumentParser(prog="python -m soft_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="eval config file (configs/eval/*.py)")
    p.add_argument("--ckpt", help="soft_jax checkpoint, Orbax manager dir or training work dir")
    p.add_argument("--hf", help="Hugging Face LlamaForCausalLM folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--exits", help="comma-separated layer counts (default: the config's exits)")
    p.add_argument("--tasks", help=f"comma-separated, some of {','.join(TASKS)}")
    p.add_argument("--out", help="output folder")
    p.add_argument("--name", help="model label in tables and figures")
    p.add_argument("--second-ckpt", help="second model (pairwise / sortedness): checkpoint")
    p.add_argument("--second-hf", help="second model: Hugging Face folder")
    p.add_argument("--judge", help="pairwise judge: rouge-l | hf:FOLDER")
    args, rest = p.parse_known_args(argv)
    cfg = load_config_file(args.config) if args.config else default_config()
    if args.ckpt:
        cfg.ckpt, cfg.hf = args.ckpt, ""
    if args.hf:
        cfg.hf, cfg.ckpt = args.hf, ""
    if args.second_ckpt:
        cfg.second.ckpt, cfg.second.hf = args.second_ckpt, ""
    if args.second_hf:
        cfg.second.hf, cfg.second.ckpt = args.second_hf, ""
    named = [f"--config.{field}={getattr(args, flag)}" for flag, field in (
        ("tokenizer", "tokenizer"), ("exits", "exits"), ("tasks", "tasks"), ("out", "out_dir"),
        ("name", "name"), ("judge", "pairwise.judge")) if getattr(args, flag) is not None]
    # two passes: a --config.FIELD given on the command line wins over the named flag
    return apply_overrides(apply_overrides(cfg, named), rest)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the eval CLI on `argv` (default: sys.argv[1:]); returns the exit status."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from soft_jax.eval.runner import run_eval

    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        run_eval(cfg)
    except (ValueError, FileNotFoundError) as e:
        return report_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
