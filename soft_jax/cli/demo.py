"""`soft-jax demo`: the embedded default. SoFT and its SFT twin (same budget) on the GSM8K
demo split, then the per-exit held-out table and a PNG plot.

    soft-jax demo [--config configs/demo.py] [--config.FIELD=VALUE ...] [--steps N] [--out DIR]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from soft_jax.cli.flags import command_parser, parse, run_command
from soft_jax.train.run_config import default_config

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.py"


def build_parser():
    """The parser of `soft-jax demo`."""
    p = command_parser("demo", __doc__, default_config, default_file=str(DEMO_CONFIG))
    p.add_argument("--steps", type=int, default=None, help="training steps of each twin")
    p.add_argument("--out", default=None, help="output folder (default: the config's workdir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax demo ...`; returns the exit status."""
    from soft_jax.reproduce.demo import run_demo

    def demo():
        args, cfg = parse(build_parser(), argv)
        return run_demo(cfg, Path(args.out or cfg.workdir), args.steps)

    return run_command(demo, argv)
