"""`soft-jax memory`: the per-device memory plan of a training step, no devices needed.

    soft-jax memory --preset llama2-13b --mesh fsdp=8 --batch 32 --seq 2048 \\
        --dtype bfloat16 --remat save_dots --device-gib 80
"""

from __future__ import annotations

from collections.abc import Sequence

from soft_jax.cli.flags import command_parser, parse, run_command
from soft_jax.model.config import REMAT_POLICIES, preset
from soft_jax.train.loss import LOSS_IMPLS
from soft_jax.train.memory import format_plan, parse_mesh, plan
from soft_jax.train.modes import MODES, exit_heads_for


def build_parser():
    """The parser of `soft-jax memory`."""
    ap = command_parser("memory", __doc__)
    ap.add_argument("--preset", default="llama2-13b", help="model preset (soft_jax.model.config)")
    ap.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=8, fsdp=2,tensor=4")
    ap.add_argument("--devices", type=int, default=None, help="device count for -1 in --mesh")
    ap.add_argument("--batch", type=int, default=32, help="global batch (sequences per step)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype")
    ap.add_argument("--param-dtype", default="float32", help="master weight dtype")
    ap.add_argument("--remat", default="save_dots", help=" | ".join(REMAT_POLICIES))
    ap.add_argument("--exits", default="", help="comma-separated exits (default: preset's)")
    ap.add_argument("--mode", default="soft", choices=MODES)
    ap.add_argument("--loss", default="auto", choices=LOSS_IMPLS)
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--attention", default="auto", help="auto | xla | cudnn")
    ap.add_argument("--backend", default="gpu", help="gpu | tpu (for the auto choices)")
    ap.add_argument("--device-gib", type=float, default=None, help="memory per device (GiB)")
    ap.add_argument("--usable", type=float, default=0.9,
                    help="fraction of the device memory the step may use")
    return ap


def run(a) -> int:
    """Plan the step and print the table."""
    overrides = dict(dtype=a.dtype, param_dtype=a.param_dtype, remat_policy=a.remat)
    if a.exits:
        overrides["exits"] = tuple(int(x) for x in a.exits.split(",") if x)
    config = preset(a.preset, **overrides)
    config = config.replace(num_exit_heads=exit_heads_for(a.mode, config.resolved_exits))
    if a.batch % a.grad_accum:
        raise ValueError(f"--batch {a.batch} is not divisible by --grad-accum {a.grad_accum}")
    mesh = parse_mesh(a.mesh, a.devices)
    p = plan(config, mesh, a.batch, a.seq, grad_accum=a.grad_accum, mode=a.mode,
             loss_impl=a.loss, chunk_tokens=a.chunk_tokens, attention=a.attention,
             backend=a.backend)
    print(format_plan(p, a.device_gib, a.usable))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax memory ...`; returns the exit status."""
    args, _ = parse(build_parser(), argv)
    return run_command(lambda: run(args), argv)
