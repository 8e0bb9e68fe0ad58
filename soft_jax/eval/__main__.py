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

import ml_collections

from soft_jax.eval.config import TASKS, default_config
from soft_jax.train_config import load_config_file


def _parse_value(old, text: str):
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, (tuple, list)):
        parts = [t.strip() for t in text.strip("()[] ").split(",") if t.strip()]
        return tuple(int(t) if t.lstrip("-").isdigit() else t for t in parts)
    return text


def set_field(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """cfg.<dotted> = text, parsed by the field's current type; unknown fields are errors."""
    node, parts = cfg, dotted.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ValueError(f"unknown eval config field config.{dotted}")
        node = node[part]
    if parts[-1] not in node:
        raise ValueError(f"unknown eval config field config.{dotted}")
    try:
        value = _parse_value(node[parts[-1]], text)
    except ValueError as e:
        raise ValueError(f"config.{dotted}: {e}") from None
    with node.ignore_type():
        node[parts[-1]] = value


def parse_args(argv) -> ml_collections.ConfigDict:
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
    for flag, field in (("tokenizer", "tokenizer"), ("exits", "exits"), ("tasks", "tasks"),
                        ("out", "out_dir"), ("name", "name"), ("judge", "pairwise.judge")):
        if getattr(args, flag) is not None:
            set_field(cfg, field, getattr(args, flag))
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--config."):
            p.error(f"unrecognized argument {arg!r}")
        if "=" in arg:
            key, value = arg[len("--config."):].split("=", 1)
        elif i + 1 < len(rest):
            key, value = arg[len("--config."):], rest[i + 1]
            i += 1
        else:
            p.error(f"{arg} needs a value")
        set_field(cfg, key, value)
        i += 1
    return cfg


def main(argv=None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from soft_jax.eval.runner import run_eval

    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        run_eval(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
