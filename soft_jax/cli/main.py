"""`soft-jax COMMAND ...`: finds the subcommand and imports only its module."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {  # name -> one line of help; each is the module soft_jax.cli.<name>
    "train": "fine-tune: SoFT, SFT, ICT (exit heads on a frozen model) or SortedNet",
    "convert": "Hugging Face / GGUF <-> soft_jax checkpoints, sub-model export",
    "generate": "decode from a sub-model, self-speculatively or with dynamic exit",
    "eval": "per-exit held-out loss, GSM8K, TriviaQA, generations, pairwise, sorted-ness",
    "harness": "lm-evaluation-harness tasks at every exit",
    "memory": "per-device memory plan of a training step",
    "compile": "the exact train step (or generation) compiled for a TPU slice: fits, --fit",
    "reproduce": "the stage-cached real-weights reproduction (SmolLM2 SFT / SoFT / ICT)",
    "demo": "the embedded default: SoFT and its SFT twin, a per-exit table and plot",
}


def usage() -> str:
    """The top-level help: every subcommand with its line."""
    lines = ["usage: soft-jax COMMAND [--help] [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`soft-jax COMMAND --help` lists a command's flags (and config fields)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `soft-jax` on `argv` (default sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    result = importlib.import_module(f"soft_jax.cli.{name}").main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
