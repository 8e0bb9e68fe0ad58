"""`soft-jax convert`: Hugging Face / GGUF <-> soft_jax checkpoints.

    soft-jax convert from-hf --hf DIR_OR_HUB_NAME --out CKPT
    soft-jax convert to-hf --ckpt CKPT_OR_WORKDIR --out DIR [--exit N] [--dtype bfloat16]
    soft-jax convert from-gguf --gguf FILE [--out CKPT] [--hf-out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from soft_jax.cli.flags import add_allow_unverified, command_parser, comma_ints, parse, run_command
from soft_jax.io.checkpoint import (CheckpointError, ensure_empty_output, load_params,
                                    read_model_config, resolve_checkpoint, tokenizer_dir_of)
from soft_jax.io.gguf import hf_from_gguf
from soft_jax.io.families import ConversionError
from soft_jax.io.hf import NP_DTYPES, check_exit, checkpoint_from_hf, save_hf
from soft_jax.model.config import DTYPES


def from_hf(args) -> Path:
    """`from-hf`: HF folder -> Orbax checkpoint + model config (+ tokenizer files)."""
    return checkpoint_from_hf(args.hf, args.out, None if args.dtype == "auto" else args.dtype,
                              comma_ints(args.exits))


def from_gguf(args) -> Path:
    """`from-gguf`: GGUF -> HF folder (`--hf-out`) and/or Orbax checkpoint (`--out`)."""
    if not (args.out or args.hf_out):
        raise ConversionError("from-gguf needs --out CKPT and/or --hf-out DIR")
    for p in (args.out, args.hf_out):
        if p:
            ensure_empty_output(Path(p))
    if not args.out:
        return hf_from_gguf(args.gguf, args.hf_out)
    Path(args.out).absolute().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(args.out).absolute().parent) as tmp:
        hf_dir = Path(args.hf_out) if args.hf_out else Path(tmp) / "hf"
        hf_from_gguf(args.gguf, hf_dir)
        return checkpoint_from_hf(hf_dir, args.out, args.dtype, comma_ints(args.exits))


def to_hf(args) -> Path:
    """`to-hf`: checkpoint (or training work dir) -> HF folder, optionally one exit's sub-model."""
    ensure_empty_output(Path(args.out))
    if args.exit is not None:  # fail before reading any weights
        check_exit(read_model_config(resolve_checkpoint(args.ckpt)), args.exit)
    config, params = load_params(args.ckpt, allow_nonfinite=args.allow_nonfinite,
                                 allow_unverified=args.allow_unverified)
    return save_hf(config, params, args.out, exit_layer=args.exit, dtype=args.dtype,
                   tokenizer_dir=tokenizer_dir_of(args.ckpt))


def build_parser():
    """The parser of `soft-jax convert` and its three subcommands."""
    p = command_parser("convert", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("from-hf", help="HF folder or hub name (Llama, Mistral, Qwen2, Qwen3) -> Orbax checkpoint")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--dtype", default="float32", choices=["auto", *DTYPES])
    a.add_argument("--exits", default=None, help="comma-separated exits to record, e.g. 8,12,16")
    g = sub.add_parser("from-gguf", help="GGUF of a supported family (dequantised) -> checkpoint / HF folder")
    g.add_argument("--gguf", required=True)
    g.add_argument("--out", default=None, help="soft_jax checkpoint folder")
    g.add_argument("--hf-out", default=None, help="plain HF folder of the model's own class")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES))
    g.add_argument("--exits", default=None, help="comma-separated exits to record")
    b = sub.add_parser("to-hf", help="Orbax checkpoint or training work dir -> HF folder")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--exit", type=int, default=None, help="write the N-layer sub-model")
    b.add_argument("--dtype", default=None, choices=list(NP_DTYPES))
    b.add_argument("--allow-nonfinite", action="store_true",
                   help="write weights holding NaN / inf (refused by default)")
    add_allow_unverified(b)
    for s in (a, g, b):  # `--debug` also after the subcommand
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="full tracebacks instead of one-line errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax convert ...`; returns the exit status."""
    args, _ = parse(build_parser(), argv)

    def convert() -> int:
        out = {"from-hf": from_hf, "to-hf": to_hf, "from-gguf": from_gguf}[args.cmd](args)
        print(f"wrote {out}")
        return 0

    return run_command(convert, argv, (CheckpointError,))
