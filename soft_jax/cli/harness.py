"""`soft-jax harness`: lm-evaluation-harness tasks at every exit of one model.

    soft-jax harness (--ckpt CKPT | --hf DIR) --exits 12,24,40 --tasks T1,T2
        [--include-path DIR] [--limit N] [--num-fewshot K] --output OUT

The model is loaded once and evaluated by lm-eval once per exit; OUT gets results.json,
results.md (an exit x task table), metrics_per_exit.png, the per-exit lm-eval samples and
the offline task YAMLs (tasks/: soft_gsm8k, soft_gsm8k_ppl, soft_arith_mc, always available).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from soft_jax.cli.flags import (add_allow_unverified, add_model_source, command_parser, parse,
                                run_command)
from soft_jax.eval.harness import load, run_exits
from soft_jax.eval.runner import resolve_exits
from soft_jax.io.checkpoint import CheckpointError
from soft_jax.model.exits import check_heads


def build_parser():
    """The parser of `soft-jax harness`."""
    p = command_parser("harness", __doc__)
    add_model_source(p)
    p.add_argument("--exits", default="", help="comma-separated layer counts (default: the "
                                               "model's exits with the last layer)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", action="append", default=[],
                   help="extra folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (or fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None,
                   help="context limit (default: the model's max_position_embeddings)")
    p.add_argument("--max-gen-toks", type=int, default=256,
                   help="generation limit when a task sets none")
    p.add_argument("--dtype", default=None, help="parameter dtype (float32, bfloat16, ...)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default: the model's)")
    add_allow_unverified(p)
    return p


def document_limit(value: float | None) -> float | int | None:
    """`--limit` as lm-eval takes it: a whole number of documents (>= 1) or a fraction in
    (0, 1); None = every document."""
    if value is None:
        return None
    if not 0 < value < 1 and not (value >= 1 and float(value).is_integer()):
        raise ValueError(f"--limit {value:g}: expected a whole number of documents (>= 1) or a "
                         "fraction of them in (0, 1)")
    return value if value < 1 else int(value)


def run(args) -> int:
    """Check the arguments, load the model once, run lm-eval at each exit, write the tables;
    an output folder this run created is removed again when the run fails."""
    limit = document_limit(args.limit)
    for d in args.include_path:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--include-path {d!r} is not a folder")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: give at least one task name")
    model = load(args.ckpt, args.hf, args.tokenizer, args.dtype, field="args",
                 allow_unverified=args.allow_unverified)
    exits = resolve_exits(model.config, [e for e in args.exits.split(",") if e.strip()],
                          "--exits")
    check_heads(model.config, model.params, exits, "--exits")
    out = Path(args.output)
    created = not out.exists()
    try:
        run_exits(model, exits, tasks, out, args.include_path, limit, args.num_fewshot,
                  args.batch_size, args.max_length, args.max_gen_toks)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"[harness] wrote {out / 'results.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax harness ...`; returns the exit status."""
    args, _ = parse(build_parser(), argv)
    return run_command(lambda: run(args), argv, (CheckpointError,))
