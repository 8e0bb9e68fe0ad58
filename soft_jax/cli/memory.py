"""`soft-jax memory`: the per-device memory plan of a training step, no devices needed.

    soft-jax memory --preset llama2-13b --mesh fsdp=8 --batch 32 --seq 2048 \\
        --dtype bfloat16 --remat save_dots --device-gib 80
"""

from __future__ import annotations

from collections.abc import Sequence

from soft_jax.cli.flags import command_parser, parse, run_command
from soft_jax.model.config import REMAT_POLICIES, preset
from soft_jax.train.loss import LOSS_IMPLS
from soft_jax.train.compile import FAMILIES, parse_topology
from soft_jax.train.memory import ESTIMATE_MARGIN, GiB, format_plan, parse_mesh, plan
from soft_jax.train.modes import MODES, exit_heads_for
from soft_jax.train.run_config import default_config, validate


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
    ap.add_argument("--usable", type=float, default=None,
                    help="fraction of the device memory the step may use (default 0.9; "
                         "1 for a TPU chip: its compiler's figure is already what is usable)")
    ap.add_argument("--chip", choices=tuple(FAMILIES), default=None,
                    help="a TPU chip: its HBM as the TPU compiler counts it, TPU defaults")
    ap.add_argument("--topology", default=None,
                    help="a TPU slice (v5e-32, v4-64, ...): --chip, and where libtpu is "
                         "installed the compiled step's peak beside the estimate")
    ap.add_argument("--slices", type=int, default=1, help="with --topology: slices (DCN data)")
    ap.add_argument("--margin", type=float, default=ESTIMATE_MARGIN,
                    help="the estimate's error against the compiler (docs/tpu.md)")
    return ap


def tpu_defaults(a) -> float:
    """--topology / --chip: the chip, its compiler's HBM and the TPU backend; returns the
    usable fraction."""
    if a.topology:
        topo = parse_topology(a.topology)
        a.chip, a.devices = topo.family.name, a.devices or topo.chips * a.slices
    if a.chip:
        a.device_gib, a.backend = a.device_gib or FAMILIES[a.chip].hbm_gib, "tpu"
    return a.usable if a.usable is not None else 1.0 if a.chip else 0.9


def run(a) -> int:
    """Plan the step and print the table (with --topology, the compiled peak beside it)."""
    usable = tpu_defaults(a)
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
    print(format_plan(p, a.device_gib, usable, a.margin, a.chip))
    if a.topology:
        print(compiled_beside(a, mesh, p))
    return 0


def compiled_beside(a, mesh: dict, p) -> str:
    """The TPU compiler's peak for the planned step on `a.topology`, beside the estimate
    (a line saying why not where libtpu is missing)."""
    import importlib.util

    from soft_jax.train.compile import LIBTPU_PIN, Target, compile_train

    if importlib.util.find_spec("libtpu") is None:
        return f"(no TPU compiler here: pip install '{LIBTPU_PIN}' to compile it)"
    r = compile_train(planned_run(a, mesh), Target.of(a.topology, a.slices))
    if r.peak_gib is None:
        return f"TPU compiler ({r.topology}): OOM, {r.oom}"
    est = p.total / GiB
    return (f"TPU compiler ({r.topology}): peak {r.peak_gib:.2f} GiB per chip (arguments "
            f"{r.argument_gib:.2f}, temporaries {r.temp_gib:.2f}), "
            f"{'FITS' if r.fits else 'OOM'}; the estimate {est:.2f} is "
            f"{100 * (est / r.peak_gib - 1):+.1f}%")


def planned_run(a, mesh: dict):
    """The training config whose step the flags plan (a preset's random init)."""
    c = default_config()
    c.mode, c.model.preset, c.model.init_from = a.mode, a.preset, ""
    if a.mode == "ict":  # the SFT model it starts from has the preset's shape
        c.model.init_from = f"runs/{a.preset}-sft"
    c.exits = tuple(int(x) for x in a.exits.split(",") if x) if a.exits else ()
    c.model.dtype, c.model.param_dtype, c.model.remat_policy = a.dtype, a.param_dtype, a.remat
    c.batch_size, c.grad_accum, c.data.seq_len, c.data.tokenizer = a.batch, a.grad_accum, a.seq, ""
    c.loss.impl, c.loss.chunk_tokens = a.loss, a.chunk_tokens or 0
    for axis, size in mesh.items():
        c.mesh[axis] = size
    c.mesh.dcn_data = a.slices
    validate(c)
    return c


def main(argv: Sequence[str] | None = None) -> int:
    """`soft-jax memory ...`; returns the exit status."""
    args, _ = parse(build_parser(), argv)
    return run_command(lambda: run(args), argv)
