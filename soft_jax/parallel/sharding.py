"""Device mesh, logical axis names and the one rules table that maps them to mesh axes.

Every parameter dimension and the activations that matter carry a *logical* name ("embed",
"mlp", "q_heads", "batch", ...). Parameters get theirs where they are born (their initializers
are wrapped in `nn.with_logical_partitioning`), so a param's names travel with it whatever
its path; `boxed_axes` reads them off a boxed (abstract) init, keyed by param path. `RULES` maps each logical name to mesh axes (MaxText / Flax
style); `logical_to_spec` turns names + a concrete shape into a `PartitionSpec`, dropping a
mesh axis when it does not divide the dimension (e.g. 2 kv heads on tensor=4 stay replicated)
or is already used by an earlier dimension. The scanned layer axis ("layers") is never sharded.

Mesh axes: ``data`` (pure data parallel: params replicated), ``fsdp`` (data parallel with
params, grads and optimizer state sharded: ZeRO-3), ``tensor`` (Megatron-style heads / MLP /
vocab split). The batch is split over data x fsdp. Multi-slice TPU or multi-node GPU: part of
data / fsdp can be placed across slices (or processes) over DCN with `dcn_data` / `dcn_fsdp`,
the rest stays inside a slice on ICI / NVLink.

Activation constraints: model code calls `constrain(x, names)`; it is a no-op unless a step
is being traced inside `activation_rules(mesh, rules)` (flax's `with_logical_constraint` is a
no-op on CPU, which would hide bugs from the CPU tests, so this is our own).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes (tried as a whole, then shorter prefixes), or
# None (replicated). One table for params and activations.
RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),  # residual stream: replicated over tensor (Megatron)
    ("activation_exits", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # parameters
    ("layers", None),  # the scanned layer stack axis: never sharded
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("head_norm", None),  # per-head q/k norm scales (Qwen3): [head_dim], tiny
    ("exit_heads", None),
)

BATCH_AXES = ("batch", "activation_length")
RESIDUAL_AXES = ("batch", "activation_length", "activation_embed")


# ----------------------------------------------------------------------------- rules
def make_rules(overrides: Iterable[Sequence] = ()) -> tuple[tuple[str, Any], ...]:
    """`RULES` with some logical names remapped, e.g. (("activation_embed", "tensor"),)."""
    table = dict(RULES)
    for item in overrides or ():
        name, axes = item[0], item[1] if len(item) > 1 else None
        if name not in table:
            raise ValueError(f"unknown logical axis {name!r} in mesh.rules; known: "
                             f"{sorted(table)}")
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        if name == "layers" and axes:
            raise ValueError("mesh.rules: the scanned layer axis 'layers' stays unsharded "
                             "(each scan step would gather a whole layer across devices)")
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"mesh.rules maps {name!r} to unknown mesh axis {a!r}; "
                                 f"mesh axes: {MESH_AXES}")
        table[name] = axes or None
    return tuple(table.items())


def _mesh_sizes(mesh) -> dict[str, int]:
    if isinstance(mesh, Mapping):
        return {k: int(v) for k, v in mesh.items()}
    return dict(mesh.shape)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=RULES) -> P:
    """PartitionSpec for a value with these logical dimension names and this shape.

    `mesh` is a Mesh or a {axis: size} dict. A mesh axis that does not divide the dimension
    (or is already used by an earlier dimension, or has size 1) is left out: the dimension
    falls back to fewer axes, then to replication. Never raises for a valid rule table.
    """
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a value of rank "
                         f"{len(shape)} {tuple(shape)}")
    sizes = _mesh_sizes(mesh)
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        cand = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        cand = tuple(a for a in cand if a in sizes and sizes[a] > 1 and a not in used)
        chosen = ()
        for k in range(len(cand), 0, -1):  # the whole tuple, then shorter prefixes
            if dim % math.prod(sizes[a] for a in cand[:k]) == 0:
                chosen = cand[:k]
                break
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def boxed_axes(boxed) -> dict[str, tuple[str | None, ...]]:
    """{dotted param path: logical names} of a tree of `nn.LogicallyPartitioned` leaves (e.g.
    `jax.eval_shape` of a boxed init). A non-scalar leaf without names is a ValueError: it
    would otherwise be replicated on every device without anyone noticing."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=_is_box):
        key = ".".join(_path_keys(path))
        shape = tuple(np.shape(leaf.value if _is_box(leaf) else leaf))
        if not _is_box(leaf):
            if shape:
                raise ValueError(f"param {key} {shape} has no logical axes: create it with an "
                                 "initializer wrapped in nn.with_logical_partitioning")
            continue
        if len(leaf.names) != len(shape):
            raise ValueError(f"param {key} has rank {len(shape)} {shape} but logical axes "
                             f"{tuple(leaf.names)}")
        out[key] = tuple(leaf.names)
    return out


def unbox(boxed):
    """Plain arrays from a tree of logical-axis boxes (no sharding constraint applied)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, boxed,
                        is_leaf=_is_box)


def logical_axes_for_path(path, ndim: int,
                          axes: Mapping[str, tuple[str | None, ...]]) -> tuple[str | None, ...]:
    """Logical names for a leaf of the params tree, or of any tree that mirrors it (optax
    mu / nu, gradients): the entry of its dict-key path in `axes` (see `boxed_axes`)."""
    key = ".".join(_path_keys(path))
    names = axes.get(key)
    if names is None:
        raise ValueError(f"no logical axes for {key or jax.tree_util.keystr(path)} (rank "
                         f"{ndim}): not a param of this model")
    if len(names) != ndim:
        raise ValueError(f"{key} has rank {ndim}; its param's logical axes are {names}")
    return names


def tree_specs(tree, axes: Mapping[str, tuple[str | None, ...]], mesh, rules=RULES):
    """PartitionSpec per leaf of a params-like tree (arrays or ShapeDtypeStructs) by the
    params' logical `axes` (see `boxed_axes`); scalars (step counters) are replicated."""
    def one(path, leaf):
        shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
        if not shape:
            return P()
        return logical_to_spec(logical_axes_for_path(path, len(shape), axes), shape, mesh,
                               rules)

    return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree, axes: Mapping[str, tuple[str | None, ...]], mesh: Mesh, rules=RULES):
    """NamedSharding per leaf (see `tree_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, axes, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_size: int, seq_len: int, rules=RULES) -> NamedSharding:
    """Inputs [batch, seq]: batch split over data x fsdp (as far as it divides)."""
    return NamedSharding(mesh, logical_to_spec(BATCH_AXES, (batch_size, seq_len), mesh, rules))


def shard_shape(shape: Sequence[int], spec: P, mesh) -> tuple[int, ...]:
    """The per-device shape of a value of `shape` under `spec`."""
    sizes = _mesh_sizes(mesh)
    out = list(shape)
    for i, axes in enumerate(tuple(spec)):
        if axes is None:
            continue
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            out[i] //= sizes[a]
    return tuple(out)


# ----------------------------------------------------------------------------- activations
@dataclasses.dataclass(frozen=True)
class _Ctx:
    mesh: Mesh
    rules: tuple


_CTX: contextvars.ContextVar[_Ctx | None] = contextvars.ContextVar("soft_jax_rules",
                                                                   default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh | None, rules=RULES):
    """While tracing inside this context, `constrain` pins activations to the mesh."""
    if mesh is None:
        yield
        return
    token = _CTX.set(_Ctx(mesh, tuple(rules)))
    try:
        yield
    finally:
        _CTX.reset(token)


def constrain(x, names: Sequence[str | None]):
    """`with_sharding_constraint` by logical names; identity outside `activation_rules`."""
    ctx = _CTX.get()
    if ctx is None or ctx.mesh.size == 1:
        return x
    spec = logical_to_spec(names, x.shape, ctx.mesh, ctx.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


# ----------------------------------------------------------------------------- mesh
@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Total sizes of the mesh axes, and how much of data / fsdp crosses slices or hosts."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1

    @property
    def axis_sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(MESH_AXES, self.axis_sizes))


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> MeshShape:
    """Sizes from a config (`data`, `fsdp`, `tensor`, optional `dcn_data`, `dcn_fsdp`; one of
    the three may be -1 = the rest of the devices); ValueError naming what does not fit."""
    get = (lambda k, d: mesh_cfg.get(k, d)) if hasattr(mesh_cfg, "get") else (
        lambda k, d: getattr(mesh_cfg, k, d))
    sizes = [int(get(a, 1)) for a in MESH_AXES]
    dcn_data, dcn_fsdp = int(get("dcn_data", 1)), int(get("dcn_fsdp", 1))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes) or dcn_data < 1 or dcn_fsdp < 1:
        raise ValueError(f"mesh sizes must be positive or -1: {dict(zip(MESH_AXES, sizes))}, "
                         f"dcn_data={dcn_data}, dcn_fsdp={dcn_fsdp}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are "
                             f"not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices "
                         f"but {num_devices} are available (use -1 for 'the rest')")
    if sizes[0] % dcn_data or sizes[1] % dcn_fsdp:
        raise ValueError(f"mesh.dcn_data={dcn_data} must divide data={sizes[0]} and "
                         f"mesh.dcn_fsdp={dcn_fsdp} must divide fsdp={sizes[1]}")
    return MeshShape(*sizes, dcn_data=dcn_data, dcn_fsdp=dcn_fsdp)


def build_mesh(mesh_cfg=None, devices: Sequence | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all
    devices of all processes). With dcn_data / dcn_fsdp > 1 the devices are arranged by
    `create_hybrid_device_mesh`: the DCN part of an axis spans TPU slices (devices with a
    `slice_index`) or else processes (multi-node GPU), the ICI part stays within one."""
    devs = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg if mesh_cfg is not None else {"data": -1}, len(devs))
    types = (AxisType.Auto,) * len(MESH_AXES)
    dcn = (shape.dcn_data, shape.dcn_fsdp, 1)
    if math.prod(dcn) > 1:
        from jax.experimental import mesh_utils

        ici = tuple(s // d for s, d in zip(shape.axis_sizes, dcn))
        multislice = all(getattr(d, "slice_index", None) is not None for d in devs) and len(
            {d.slice_index for d in devs}) > 1
        arr = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devs, process_is_granule=not multislice, allow_split_physical_axes=True)
        return Mesh(arr, MESH_AXES, axis_types=types)
    if devs[0].platform == "tpu":  # laid out on the chips' torus; an axis may split one of
        # its dimensions (tensor=2 on an 8x8 v6e), which jax.make_mesh refuses
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape.axis_sizes, devs,
                                            allow_split_physical_axes=True)
        return Mesh(arr, MESH_AXES, axis_types=types)
    if devices is None:
        return jax.make_mesh(shape.axis_sizes, MESH_AXES, axis_types=types)
    return Mesh(np.asarray(devs, dtype=object).reshape(shape.axis_sizes), MESH_AXES,
                axis_types=types)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "1 device"


# ----------------------------------------------------------------------------- placement
def place(tree, shardings):
    """Put a tree of host (numpy) or device arrays onto `shardings` (a matching tree).

    Host arrays go through `make_array_from_callback` (every process holds the full value and
    hands each of its devices only its shard: works multi-process); device arrays are
    resharded with `device_put`."""
    def one(x, s):
        if isinstance(x, jax.Array) and (x.is_fully_addressable == s.is_fully_addressable):
            return x if x.sharding == s else jax.device_put(x, s)
        x = np.asarray(x)  # host copy: a process-local array going onto a global mesh
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def process_rows(sharding: NamedSharding, global_rows: int) -> list[tuple[int, int]]:
    """The row ranges [lo, hi) of a [global_rows, ...] batch this process's devices hold,
    sorted and merged (what `make_array_from_process_local_data` expects, concatenated)."""
    ranges = set()
    for idx in sharding.addressable_devices_indices_map((global_rows,)).values():
        lo, hi, _ = idx[0].indices(global_rows)
        ranges.add((lo, hi))
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def global_batch(rows_fn, sharding: NamedSharding, global_rows: int) -> dict:
    """A global batch of jax.Arrays from per-process data: `rows_fn(lo, hi)` returns the numpy
    rows [lo, hi) of the global batch (a dict of [hi - lo, ...] arrays); each process builds
    only the rows its devices hold."""
    parts = [rows_fn(lo, hi) for lo, hi in process_rows(sharding, global_rows)]
    local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
            for k, v in local.items()}
