"""`soft-jax compile`: the exact train step (or generation) compiled for a TPU slice by the TPU
compiler on this host, no TPU needed; per chip: memory against the HBM, FITS / OOM, compile
seconds, FLOPs, collectives.

    soft-jax compile --config configs/llama2_13b_alpaca_soft.py --topology v5e-32 \\
        [--config.FIELD=VALUE ...] [--slices N] [--compare sft] [--fit] [--json OUT]
    soft-jax compile --config FILE --topology v5e-1 --decode [--decode-batch B] \\
        [--max-len S] [--draft-exit N] [--tensor N]

--topology takes v4-8 ... v4-4096, v5e-1 ... v5e-256, v5p-8 ..., v6e-1 ... v6e-256 (v4 and
v5p names count cores, two per chip), the gcloud names (v5litepod-16) or a compiler
topology (v5p:4x4x12). --slices N compiles for N slices over DCN: the config's mesh.dcn_data
x mesh.dcn_fsdp must be N. --fit searches remat (least recompute first), then the largest
micro-batch that splits over data x fsdp, and prints the --config. flags to paste.
Exit status: 0 when every compiled program fits, 3 when one does not, 2 for bad input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from soft_jax.cli.flags import command_parser, parse, run_command
from soft_jax.infer.compile import compile_decode
from soft_jax.train.compile import (FIT_POLICIES, Report, Target, compile_train, fit, fit_flags,
                                    format_ratio, format_report, twin)
from soft_jax.train.run_config import default_config, validate


def build_parser():
    """The parser of `soft-jax compile`."""
    ap = command_parser("compile", __doc__, default_config, config_required=True)
    ap.add_argument("--topology", required=True, help="v5e-32, v4-64, v5p-128, v6e-16, ...")
    ap.add_argument("--slices", type=int, default=1, help="slices over DCN (mesh.dcn_*)")
    ap.add_argument("--compare", choices=("sft",), help="also compile the SFT twin")
    ap.add_argument("--json", help="write the figures as a list of rows to this file")
    ap.add_argument("--fit", action="store_true",
                    help="search remat and grad_accum for the config that fits")
    ap.add_argument("--headroom", type=float, default=0.03,
                    help="--fit keeps this fraction of the HBM free")
    ap.add_argument("--decode", action="store_true", help="compile generation instead")
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=2048, help="tokens the KV cache holds")
    ap.add_argument("--draft-exit", type=int, default=None,
                    help="self-speculation draft exit (default: the first exit)")
    ap.add_argument("--tensor", type=int, default=1, help="chips in the tensor-parallel group")
    ap.add_argument("--decode-dtype", default="bfloat16", help="weights and compute dtype")
    ap.add_argument("--decode-split-layers", action="store_true",
                    help="decode from the per-layer copy of the weights (what CPU decoding "
                         "keeps beside the stack), to measure it")
    return ap


def run(args, cfg) -> tuple[list[Report], bool]:
    """Compile what the flags ask for, printing each program's report as it is done:
    (the reports, whether the programs asked for fit; --fit: whether a config was found)."""
    target = Target.of(args.topology, args.slices)
    t = target.topo
    print(f"soft-jax compile: {args.config} for {t.name} x {target.slices} slice(s) "
          f"({t.compiler_name}, {len(target.devices)} x {target.devices[0].device_kind}, "
          f"{target.hbm_gib:.2f} GiB HBM per chip as the compiler counts it)", flush=True)
    if args.decode:
        reports = compile_decode(cfg, target, args.decode_batch, args.max_len,
                                 args.draft_exit, args.tensor, args.decode_dtype,
                                 args.decode_split_layers)
        for r in reports:
            print(format_report(r), flush=True)
        return reports, all(r.fits for r in reports)
    if args.fit:
        tried_line = lambda r: print(  # noqa: E731
            f"  tried remat={r.details['remat']} grad_accum={r.details['grad_accum']}: "
            + (f"peak {r.peak_gib:.2f} GiB, " if r.peak_gib is not None else "")
            + ("fits" if r.fits else "does not fit") + f" ({r.compile_s:.0f} s)", flush=True)
        print(f"fit: remat {' > '.join(FIT_POLICIES)}, then the largest micro-batch, within "
              f"{(1 - args.headroom) * target.hbm_gib:.2f} GiB ({args.headroom:.0%} headroom)")
        fitted, reports = fit(cfg, target, args.headroom, tried_line)
        if fitted is None:
            print("fit: nothing fits this slice; a larger slice, a smaller batch or a shorter "
                  "seq_len is needed")
            return reports, False
        chosen = next(r for r in reports[::-1] if r.fits)
        chosen.details["chosen"] = True
        print(format_report(chosen))
        print(f"fit: {fit_flags(fitted)}", flush=True)
        cfg = fitted
    else:
        chosen = compile_train(cfg, target)
        reports = [chosen]
        print(format_report(chosen), flush=True)
    if args.compare:
        other = compile_train(twin(cfg, mode=args.compare), target, args.headroom * args.fit)
        print(format_report(other), flush=True)
        print(format_ratio(chosen, other))
        reports.append(other)
    return reports, chosen.fits and (not args.compare or reports[-1].fits)


def compile_command(argv: Sequence[str] | None) -> int:
    """Parse, compile, write --json; the exit status (0 fits, 3 does not)."""
    args, cfg = parse(build_parser(), argv)
    validate(cfg)
    if not 0 <= args.headroom < 1:
        raise ValueError(f"--headroom {args.headroom}: expected a fraction in [0, 1)")
    reports, ok = run(args, cfg)
    if args.json:
        Path(args.json).write_text(json.dumps([r.row() for r in reports], indent=1) + "\n")
    return 0 if ok else 3


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax compile ...`; returns the exit status (2 for bad input)."""
    return run_command(lambda: compile_command(argv), argv)
