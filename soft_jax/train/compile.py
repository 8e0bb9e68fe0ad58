"""Ahead-of-time compile of the exact train step for a TPU slice, on any host: the library of
`soft-jax compile` (soft_jax/cli/compile.py; generation: soft_jax/infer/compile.py).

libtpu (requirements.txt) is the TPU compiler; `jax.experimental.topologies` gives the
slice's devices without any TPU attached. The train step is built by the trainer's own
functions (`train.loop.run_mesh`, `run_model_config`, `build_step`, `abstract_batch`), so
mode, exits and weights, mesh (-1 and dcn_* included), rules, remat, loss, grad_accum,
batch, seq_len and packing are the run's; the state and batch are shapes only (no data, no
weights). Per chip it reports what `memory_analysis()` says the program needs against the
chip's HBM as the compiler counts it, the FLOPs and the collectives in the compiled HLO. The
compiler's RESOURCE_EXHAUSTED is a result (an OOM report), not a crash.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from soft_jax.utils.platforms import prepare_tpu_compiler

GiB = 2 ** 30
LIBTPU_PIN = "libtpu==0.0.42.*"  # what jax[tpu]==0.10.2 installs (requirements.txt)
# Remat policies from least recompute to most (offload_dots trades host traffic instead).
FIT_POLICIES = ("none", "save_dots", "save_qkv_out_gate_up", "save_qkv_out", "full")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast")
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SIZE = re.compile(r"\(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 2 ** 10}


# ----------------------------------------------------------------------------- topologies
@dataclasses.dataclass(frozen=True)
class ChipFamily:
    """A TPU generation: how its slice names count, its grid and its HBM per chip."""

    name: str  # our name: v4, v5e, v5p, v6e
    prefix: str  # the compiler's topology prefix (v5p is "v5")
    gcloud: str  # accelerator-type prefix (v5e is "v5litepod")
    ndim: int  # 2-D or 3-D torus
    cores_per_chip: int  # v4 / v5p names count TensorCores, two per (megacore) chip
    chip_config: str  # the compiler's chip config
    hbm_gib: float  # HBM per chip as the compiler reports it (libtpu 0.0.42.1)


FAMILIES = {f.name: f for f in (
    ChipFamily("v4", "v4", "v4", 3, 2, "megacore", 30.75),
    ChipFamily("v5e", "v5e", "v5litepod", 2, 1, "default", 15.75),
    ChipFamily("v5p", "v5", "v5p", 3, 2, "megacore", 95.74),
    ChipFamily("v6e", "v6e", "v6e", 2, 1, "default", 31.25),
)}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: family, chips and their grid (e.g. v5e-32 = 32 chips as 4x8)."""

    family: ChipFamily
    grid: tuple[int, ...]

    @property
    def chips(self) -> int:
        """Chips in the slice."""
        return math.prod(self.grid)

    @property
    def name(self) -> str:
        """Our name of the slice, e.g. v5e-32 or v4-32 (v4 / v5p: cores)."""
        return f"{self.family.name}-{self.chips * self.family.cores_per_chip}"

    @property
    def compiler_name(self) -> str:
        """The compiler's topology name, e.g. v5e:4x8."""
        return f"{self.family.prefix}:{'x'.join(map(str, self.grid))}"

    @property
    def accelerator_type(self) -> str:
        """The gcloud accelerator type, e.g. v5litepod-32."""
        return f"{self.family.gcloud}-{self.chips * self.family.cores_per_chip}"


def chip_grid(chips: int, ndim: int) -> tuple[int, ...]:
    """The slice shape of `chips` (a power of two): as even as it goes, the longer axes last
    (32 -> 4x8, 16 3-D -> 2x2x4); a 4-chip 3-D slice is one host, 2x2x1."""
    if ndim == 3 and chips == 4:
        return (2, 2, 1)
    e = int(math.log2(chips))
    return tuple(2 ** (e // ndim + (i >= ndim - e % ndim)) for i in range(ndim))


def parse_topology(name: str) -> Topology:
    """A slice from a name like v5e-32, v4-64, v5p-128, v6e-16, v5litepod-16, or a compiler
    topology like v5e:4x8 / v4:2x2x4; ValueError naming --topology otherwise."""
    known = ", ".join(f"{f}-N" for f in FAMILIES)
    m = re.fullmatch(r"(v\d[a-z]*):(\d+(?:x\d+)+)", name.strip())
    if m:
        family = FAMILIES.get(ALIASES.get(m.group(1), m.group(1)))
        grid = tuple(int(x) for x in m.group(2).split("x"))
        if family is None or len(grid) != family.ndim or min(grid) < 1:
            raise ValueError(f"--topology {name!r}: expected e.g. v5e:4x8 or v4:2x2x4")
        return Topology(family, grid)
    m = re.fullmatch(r"(v\d[a-z]*)-(\d+)", name.strip())
    family = FAMILIES.get(ALIASES.get(m.group(1), m.group(1))) if m else None
    if family is None:
        raise ValueError(f"--topology {name!r}: unknown slice; expected {known} or a compiler "
                         "topology such as v5e:4x8")
    count = int(m.group(2))
    chips, odd = divmod(count, family.cores_per_chip)
    smallest = 4 if family.ndim == 3 else 1
    if odd or chips < smallest or chips & (chips - 1) or (family.ndim == 2 and chips == 2):
        raise ValueError(f"--topology {name!r}: a {family.name} slice counts "
                         f"{'cores (2 per chip)' if family.cores_per_chip == 2 else 'chips'}"
                         f" in powers of two from {family.name}-{smallest * family.cores_per_chip}"
                         " (other shapes: give the compiler topology, e.g. v5p:4x4x12)")
    return Topology(family, chip_grid(chips, family.ndim))


def tpu_devices(topo: Topology, slices: int = 1) -> list:
    """The compile-only devices of `slices` copies of the slice (multi-slice over DCN)."""
    prepare_tpu_compiler(topo.accelerator_type)
    try:
        import libtpu  # noqa: F401  the compiler itself
    except ImportError:
        raise ValueError(f"the TPU compiler is not installed: pip install '{LIBTPU_PIN}' "
                         "(requirements.txt has it)") from None
    from jax.experimental.topologies import get_topology_desc

    bounds = {"chips_per_host_bounds": (1, 1, 1)} if topo.chips == 1 else {}
    return list(get_topology_desc(platform="tpu", topology_name=topo.compiler_name,
                                  chip_config_name=topo.family.chip_config,
                                  num_slices=slices, **bounds).devices)


_HBM: dict[str, float] = {}


def compiler_hbmgib_of(device, fallback: float) -> float:
    """HBM per chip as the compiler counts it: the limit its out-of-memory error names for a
    program that cannot fit (`fallback` when the message does not say)."""
    kind = device.device_kind
    if kind not in _HBM:
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        one = NamedSharding(Mesh(np.asarray([device]), ("x",)), P())
        huge = lambda x: jax.lax.optimization_barrier(  # noqa: E731
            jnp.broadcast_to(x, (2 ** 18,) + x.shape) * 2).sum()
        try:
            jax.jit(huge, in_shardings=one, out_shardings=one).lower(
                jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=one)).compile()
            _HBM[kind] = fallback
        except Exception as e:  # noqa: BLE001  the expected RESOURCE_EXHAUSTED
            m = re.search(r"available HBM \(([\d.]+)([KMGT])\)", str(e))
            _HBM[kind] = float(m.group(1)) * _UNITS[m.group(2)] if m else fallback
    return _HBM[kind]


# ----------------------------------------------------------------------------- reports
@dataclasses.dataclass
class Report:
    """Per-chip figures of one compiled program (GiB, seconds, TFLOPs)."""

    mode: str
    topology: str
    slices: int
    chips: int
    hbm_gib: float
    compile_s: float
    peak_gib: float | None  # argument + output + temp - alias (None: the compiler gave up)
    fits: bool
    oom: str | None = None  # the compiler's message when it ran out of memory
    argument_gib: float | None = None
    output_gib: float | None = None
    temp_gib: float | None = None
    alias_gib: float | None = None
    model_tflops: float | None = None  # per chip, one step / one call
    compiled_tflops: float | None = None  # the compiler's cost analysis (a loop body once)
    collectives: dict = dataclasses.field(default_factory=dict)
    details: dict = dataclasses.field(default_factory=dict)

    def row(self) -> dict:
        """The JSON row: every figure, the details flattened in."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "details"}
        return {**out, **self.details}


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collectives by kind in compiled HLO text (an async pair counts once; a loop body's
    collectives count once, not per iteration)."""
    counts: dict[str, int] = {}
    for m in _COLLECTIVE_OP.finditer(hlo_text):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return dict(sorted(counts.items()))


def oom_tempgib_of(message: str) -> float | None:
    """The temporaries an out-of-memory message says the program needs, in GiB."""
    m = re.search(r"temporaries " + _SIZE.pattern, message)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def compile_program(lower: Callable, hbm_gib: float, headroom: float = 0.0) -> dict:
    """Lower and compile; the per-chip figures as Report fields. It fits when the compiler
    did not run out of memory and the peak is within (1 - headroom) of the HBM."""
    t0 = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as e:  # noqa: BLE001  only the compiler's out-of-memory is a result
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        msg = str(e).strip().splitlines()[0]
        return dict(compile_s=time.perf_counter() - t0, peak_gib=None, fits=False, oom=msg,
                    temp_gib=oom_tempgib_of(msg))
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    gib = {k: getattr(ma, f"{k}_size_in_bytes") / GiB
           for k in ("argument", "output", "temp", "alias")}
    peak = gib["argument"] + gib["output"] + gib["temp"] - gib["alias"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = dict(compile_s=seconds, peak_gib=peak, fits=peak <= (1 - headroom) * hbm_gib,
               compiled_tflops=float(cost.get("flops", 0.0)) / 1e12,
               collectives=collective_counts(compiled.as_text()),
               **{f"{k}_gib": v for k, v in gib.items()})
    del compiled
    gc.collect()
    return out


# ----------------------------------------------------------------------------- train step
def model_shape(cfg):
    """(LlamaConfig shape, where it came from) of the model the run starts from, without
    weights: a local checkpoint's or HF folder's config, a hub model's cached config.json,
    else the preset (its vocabulary as the tokenizer would set it)."""
    from soft_jax.train.loop import preset_config

    src = cfg.model.init_from
    if src:
        shape = _stored_shape(src)
        if shape is not None:
            return shape, f"the config of {src}"
    vocab, why = _tokenizer_vocab(cfg)
    note = f"preset {cfg.model.preset}" + (f", vocab {vocab} ({why})" if why else "")
    if src:
        note += f"; {src} is not readable here, the preset has its shape"
    return preset_config(cfg, vocab), note


def _stored_shape(src: str):
    from soft_jax.io.checkpoint import read_model_config, resolve_checkpoint
    from soft_jax.io.hf import config_from_hf, is_hf_folder

    path = Path(src)
    try:
        if path.exists():
            if is_hf_folder(path):
                return config_from_hf(json.loads((path / "config.json").read_text()))
            return read_model_config(resolve_checkpoint(path))
        from huggingface_hub import hf_hub_download

        cached = hf_hub_download(src, "config.json", local_files_only=True)
        return config_from_hf(json.loads(Path(cached).read_text()))
    except Exception:  # noqa: BLE001  unreadable here: the caller falls back to the preset
        return None


def _tokenizer_vocab(cfg) -> tuple[int, str]:
    """The vocabulary a preset run gets from its tokenizer (the preset's when unknown)."""
    from soft_jax.model.config import preset

    spec = cfg.data.tokenizer
    if spec.startswith("bpe:"):
        return int(spec.split(":", 1)[1]), f"{spec}, at most"
    if spec:
        try:
            from soft_jax.data.tokenizer import load_tokenizer

            return len(load_tokenizer(spec)), f"tokenizer {spec}"
        except Exception:  # noqa: BLE001  not available offline
            pass
    return preset(cfg.model.preset).vocab_size, ""


def check_slices(cfg, slices: int) -> None:
    """The mesh's DCN part must span exactly the slices."""
    dcn = int(cfg.mesh.dcn_data) * int(cfg.mesh.dcn_fsdp)
    if slices < 1 or dcn != slices:
        raise ValueError(f"--slices {slices}: config.mesh.dcn_data x config.mesh.dcn_fsdp "
                         f"must equal the slice count, got {dcn} (e.g. "
                         f"--config.mesh.dcn_data={max(slices, 1)})")


@dataclasses.dataclass
class Target:
    """Where programs are compiled for: the slice, its devices and their HBM."""

    topo: Topology
    slices: int
    devices: list
    hbm_gib: float

    @classmethod
    def of(cls, name: str, slices: int = 1) -> "Target":
        """The target of a slice name: its devices and the compiler's HBM per chip."""
        topo = parse_topology(name)
        devices = tpu_devices(topo, slices)
        return cls(topo, slices, devices, compiler_hbmgib_of(devices[0], topo.family.hbm_gib))

    def report(self, mode: str, figures: dict, **details) -> Report:
        """A Report of compiled `figures` on this target."""
        return Report(mode=mode, topology=self.topo.name, slices=self.slices,
                      chips=len(self.devices), hbm_gib=self.hbm_gib, **figures,
                      details=details)


def compile_train(cfg, target: Target, headroom: float = 0.0) -> Report:
    """Compile the step `soft_jax.train` would run for `cfg` on the target slice. When its
    arguments alone (state and batch, exact from their shardings) exceed the HBM it is an
    OOM without compiling."""
    from soft_jax.parallel import sharding as shd
    from soft_jax.train.flops import step_flops
    from soft_jax.train.loop import abstract_batch, build_step, run_mesh, run_model_config
    from soft_jax.train.modes import train_exits
    from soft_jax.train.step import sharded_target

    check_slices(cfg, target.slices)
    mesh, rules = run_mesh(cfg, target.devices)
    shape, source = model_shape(cfg)
    config = run_model_config(cfg, shape, 0)
    built = build_step(cfg, config, mesh, rules, backend="tpu")
    state, batch = sharded_target(built.abstract, built.part), abstract_batch(cfg, built.part)
    arguments = gib_of((state, batch))
    if arguments > target.hbm_gib:
        figures = dict(compile_s=0.0, peak_gib=None, fits=False, argument_gib=arguments,
                       oom=f"not compiled: the state and batch alone need {arguments:.2f} GiB "
                           "per chip")
    else:
        figures = compile_program(lambda: built.step_fn.lower(state, batch), target.hbm_gib,
                                  headroom)
    tokens = cfg.batch_size * cfg.data.seq_len
    figures["model_tflops"] = step_flops(config, cfg.mode, tokens, cfg.data.seq_len) / (
        1e12 * mesh.size)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.grad_accum
    return target.report(
        cfg.mode, figures, mesh=shd.describe(mesh), remat=config.remat_policy,
        grad_accum=int(cfg.grad_accum), batch=int(cfg.batch_size), seq=int(cfg.data.seq_len),
        micro_batch=micro, micro_split=micro % dp == 0,
        exits=list(train_exits(config, cfg.mode)), model=source, state_gib=gib_of(state),
        params_b=_param_count(built.abstract.params) / 1e9)


def _param_count(params) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def twin(cfg, **changes):
    """A copy of the run config with some dotted fields changed."""
    c = cfg.copy_and_resolve_references()
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


# ----------------------------------------------------------------------------- --fit
def accum_choices(batch: int, dp: int) -> list[int]:
    """grad_accum values whose micro-batch splits over data x fsdp, largest micro-batch first."""
    return [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % dp == 0]


def fit(cfg, target: Target, headroom: float, on_try: Callable[[Report], None]):
    """The least-recompute remat policy, then the largest micro-batch, that compiles within
    (1 - headroom) of the HBM: (the fitted config or None, every report tried)."""
    from soft_jax.train.loop import run_mesh

    mesh, _ = run_mesh(cfg, target.devices)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    choices = accum_choices(int(cfg.batch_size), dp)
    if not choices:
        raise ValueError(f"config.batch_size={cfg.batch_size} does not split over data x fsdp "
                         f"= {dp} for any grad_accum")
    tried: list[Report] = []

    def fits(policy: str, accum: int) -> bool:
        r = compile_train(twin(cfg, **{"model.remat_policy": policy, "grad_accum": accum}),
                          target, headroom)
        tried.append(r)
        on_try(r)
        return r.fits

    for policy in FIT_POLICIES:
        best = _largest_fitting(choices, lambda accum: fits(policy, accum))
        if best is not None:
            return twin(cfg, **{"model.remat_policy": policy, "grad_accum": best}), tried
    return None, tried


def _largest_fitting(choices: list[int], fits: Callable[[int], bool]) -> int | None:
    """The first of `choices` (largest micro-batch first) that fits, compiling few: the
    largest (often it fits), the smallest (if it does not, none does: memory grows with the
    micro-batch; an out-of-memory compile is quick), then a bisection between them."""
    if fits(choices[0]):
        return choices[0]
    if len(choices) == 1 or not fits(choices[-1]):
        return None
    lo, hi = 0, len(choices) - 1  # choices[lo] does not fit, choices[hi] does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(choices[mid]) else (mid, hi)
    return choices[hi]


def fit_flags(cfg) -> str:
    """The `--config.` flags that select a fitted config's remat and grad_accum."""
    return (f"--config.model.remat_policy={cfg.model.remat_policy} "
            f"--config.grad_accum={cfg.grad_accum}")


def placed(tree, shardings):
    """A tree of shapes with these shardings (ShapeDtypeStructs)."""
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def gib_of(tree) -> float:
    """Per-chip GiB of a tree of sharded shapes."""
    import jax

    from soft_jax.parallel import sharding as shd

    return sum(math.prod(shd.shard_shape(x.shape, x.sharding.spec, x.sharding.mesh))
               * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)) / GiB


# ----------------------------------------------------------------------------- printing
def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}"


def format_report(r: Report) -> str:
    """A few lines per compiled program."""
    d = r.details
    if r.mode.startswith("decode"):
        head = (f"{r.mode}: {d['mesh']}, batch {d['batch']}, {d['cache_slots']} cache slots, "
                f"{d['dtype']} weights {_g(d['params_gib'])} GiB + KV cache "
                f"{_g(d['kv_cache_gib'])} GiB per chip"
                + (f", drafting with exit {d['draft_exit']}" if d.get("draft_exit") else ""))
    else:
        head = (f"{r.mode}: {d['mesh']}; batch {d['batch']} x {d['seq']}, grad_accum "
                f"{d['grad_accum']} (micro-batch {d['micro_batch']} rows"
                + ("" if d["micro_split"] else ", NOT split over data x fsdp: replicated")
                + f"); remat {d['remat']}; exits {','.join(map(str, d['exits']))}")
    if r.peak_gib is None:
        verdict = f"OOM: {r.oom}"
    else:
        verdict = "FITS" if r.fits else "OOM"
        verdict += f" ({r.hbm_gib - r.peak_gib:+.2f} GiB left)"
    lines = [head,
             f"  per chip GiB: arguments {_g(r.argument_gib)}, outputs {_g(r.output_gib)}, "
             f"temporaries {_g(r.temp_gib)}, aliased {_g(r.alias_gib)}; peak {_g(r.peak_gib)} "
             f"of {r.hbm_gib:.2f} HBM: {verdict}",
             f"  compile {r.compile_s:.1f} s; TFLOPs per chip: model "
             + ("-" if r.model_tflops is None else f"{r.model_tflops:.3g}")
             + ", compiled " + ("-" if r.compiled_tflops is None else
                                f"{r.compiled_tflops:.3g} (a loop body counted once)")]
    if d.get("held_gib") is not None:
        lines.append(f"  generation holds {d['held_gib']:.2f} GiB per chip: the peak"
                     + (" + the stacked weights the per-layer copy is made from"
                        if d["split_layers"] else " (one copy of the weights)"))
    if r.collectives:
        lines.append("  collectives: " + ", ".join(f"{k} {n}" for k, n in r.collectives.items()))
    return "\n".join(lines)


def format_ratio(a: Report, b: Report) -> str:
    """SoFT/SFT (or any two modes): peak and temporaries ratios."""
    if a.peak_gib is None or b.peak_gib is None:
        return f"{a.mode}/{b.mode}: - (an OOM)"
    temp = f"{a.temp_gib / b.temp_gib:.3f}" if b.temp_gib else "-"
    return (f"{a.mode}/{b.mode}: peak {a.peak_gib / b.peak_gib:.3f}, temporaries {temp}, "
            f"compile time {a.compile_s / max(b.compile_s, 1e-9):.2f}x")


