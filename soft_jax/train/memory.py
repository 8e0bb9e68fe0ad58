"""Memory planner: bytes per device of a SoFT training step for a model, mesh and batch
(its command is `soft-jax memory`).

No devices are needed: parameter shapes come from `jax.eval_shape` of the real init and each
leaf's per-device shard from the same logical-axis rules the trainer uses
(`sharding.logical_to_spec`, divisibility fallback included), so parameter, gradient and AdamW
bytes are exact; the trainable groups, the trained exits, the loss implementation and the
attention kernel are the trainer's own choices (`train_config.trainable_keys` /
`train_exits`, `loss.resolve_loss_impl`, `layers.attention_impl`). Activations are a model
of what the step keeps for the backward pass:

* per layer, under the remat policy: the layer input (the residual stream carried by the
  scan, for every policy but "none") plus the tagged activations the policy saves
  (`config.REMAT_SAVES`); `none`: everything (estimated: norms, attention probabilities,
  SwiGLU intermediates as well);
* the exit buffer [exits, tokens, hidden] and its gradient;
* the loss: plain = float32 logits of every exit kept for backward; chunked = one chunk of
  float32 logits (+ softmax and its gradient) and the hidden-state gradient buffer;
* transient (live at the peak, not kept): one layer's recomputation during backward, the
  FSDP all-gathered weights of one layer (plus one prefetched), attention scores when the
  attention is not fused (XLA) -- the largest single item of a long sequence.

XLA may fuse, reorder or add copies; treat activations as a good estimate (the test compares
them with `compiled.memory_analysis()` on a tiny model) and keep headroom (`--usable`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from soft_jax.parallel import sharding as shd
from soft_jax.train.chunked_loss import chunk_positions, default_chunk_tokens
from soft_jax.model.config import DTYPES, REMAT_SAVES, LlamaConfig
from soft_jax.data.formats import pack_examples
from soft_jax.model.layers import attention_impl
from soft_jax.train.loss import resolve_loss_impl
from soft_jax.train.modes import train_exits, trainable_keys

GiB = 2 ** 30
# How far the estimate may be from the TPU compiler's figure (docs/tpu.md: SoFT / SFT steps)
ESTIMATE_MARGIN = 0.10
# what the trainer feeds a step: the arrays of a packed batch, bytes per token
_EMPTY_BATCH = pack_examples([], 1, pack=True)
BATCH_KEYS = {k: v.dtype.itemsize for k, v in _EMPTY_BATCH.items()}
# training batches carry segment ids, so the attention the step traces is the masked one
_TRAIN_MASKED = "segment_ids" in _EMPTY_BATCH


@dataclasses.dataclass
class Plan:
    """Per-device bytes of one training step (see the module docstring)."""

    config: LlamaConfig
    mesh: dict
    batch: int
    seq: int
    grad_accum: int
    mode: str
    rows_per_device: float  # micro-batch rows each device computes
    batch_split: bool  # False: the micro-batch does not divide over data x fsdp (replicated)
    loss_impl: str
    chunk_tokens: int
    attention: str
    items: dict  # name -> bytes (kept for the whole step)
    transient: dict  # name -> bytes (the peak's short-lived part)
    num_params: int

    @property
    def exits(self) -> tuple[int, ...]:
        """The exits whose loss the step computes."""
        return train_exits(self.config, self.mode)

    @property
    def state_bytes(self) -> int:
        return sum(self.items[k] for k in ("params", "grads", "optimizer"))

    @property
    def total(self) -> int:
        return sum(self.items.values()) + max(self.transient.values(), default=0)

    @property
    def argument_bytes(self) -> int:
        """What the jitted step takes in: state (params, AdamW, the int32 step) and batch --
        `compiled.memory_analysis().argument_size_in_bytes`."""
        return self.items["params"] + self.items["optimizer"] + self.items["batch"] + 4

    @property
    def working_bytes(self) -> int:
        """Everything else at the peak: gradients, activations, loss, the largest transient
        (compare with `memory_analysis().temp_size_in_bytes`)."""
        return self.total - self.argument_bytes + 4


def _nbytes(dtype) -> int:
    return int(np.dtype(DTYPES[dtype] if isinstance(dtype, str) else dtype).itemsize)


def _per_device(names, shape, mesh, rules, itemsize) -> int:
    spec = shd.logical_to_spec(names, shape, mesh, rules)
    return math.prod(shd.shard_shape(shape, spec, mesh)) * itemsize


def param_bytes(params_abstract, axes, mesh: dict, rules=shd.RULES, keys=None) -> int:
    """Exact per-device bytes of a params-like tree (leaves with .shape and .dtype) whose
    params declare logical `axes` (`param_axes(config)`), or of its top-level groups `keys`."""
    if keys is not None:
        params_abstract = {k: params_abstract[k] for k in keys}
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params_abstract):
        names = shd.logical_axes_for_path(path, len(leaf.shape), axes)
        total += _per_device(names, leaf.shape, mesh, rules, np.dtype(leaf.dtype).itemsize)
    return total


def abstract_params(config: LlamaConfig):
    """(ShapeDtypeStructs of the params, their logical axes by path)."""
    from soft_jax.model.transformer import init_params, param_axes

    return (jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))),
            param_axes(config))


def state_bytes(params, axes, mesh: dict, rules, mode: str) -> dict:
    """Per-device params, gradients and AdamW bytes: the optimizer covers the trainable
    groups only (ICT: the exit heads)."""
    trainable = param_bytes(params, axes, mesh, rules, trainable_keys(params, mode))
    # AdamW: mu and nu mirror the trainable params; two int32 step counters (adam, schedule)
    return {"params": param_bytes(params, axes, mesh, rules), "grads": trainable,
            "optimizer": 2 * trainable + 2 * 4}


@dataclasses.dataclass(frozen=True)
class Activations:
    """Per-device sizes of one micro-batch's activations (`n` tokens per device)."""

    n: int
    itemsize: int  # compute dtype
    d: int  # hidden, full width
    d_act: int  # hidden as the residual stream is split
    q_w: int  # query width (local heads x head_dim)
    kv_w: int
    f_w: int  # MLP width
    v: int  # vocab as the logits are split
    scores: int  # bytes of unfused attention logits + probabilities (0 when fused)
    qk_norm: bool = False  # Qwen3: the projections before the per-head norm are tagged too

    def tag_bytes(self, tag: str) -> int:
        """Bytes of one checkpoint_name-tagged activation of a layer (layers.py); 0 for a tag
        this config's layer does not produce."""
        norm_in = self.qk_norm
        width = {"query_proj": self.q_w, "key_proj": self.kv_w, "value_proj": self.kv_w,
                 "attn_out": self.d, "mlp_gate": self.f_w, "mlp_up": self.f_w,
                 "mlp_out": self.d, "query_pre_norm": self.q_w * norm_in,
                 "key_pre_norm": self.kv_w * norm_in}
        return self.n * width[tag] * self.itemsize

    @property
    def residual(self) -> int:
        return self.n * self.d_act * self.itemsize

    @property
    def layer_working_set(self) -> int:
        """Every intermediate of one layer (estimate: q/k/v, norms, SwiGLU, attention)."""
        n, cb = self.n, self.itemsize
        qkv = n * (self.q_w + 2 * self.kv_w) * cb * (2 if self.qk_norm else 1)
        return (self.residual + qkv + 4 * n * self.d * cb + 4 * n * self.f_w * cb
                + n * self.q_w * cb + self.scores)

    @property
    def layer_forward_set(self) -> int:
        """What one layer's forward alone holds (a frozen body): q/k/v, the SwiGLU pair and
        the attention logits in float32 with probabilities in the compute dtype."""
        n, cb = self.n, self.itemsize
        return (self.residual + n * (self.q_w + 2 * self.kv_w) * cb + 2 * n * self.f_w * cb
                + self.scores * (4 + cb) // 8)

    def saved_per_layer(self, policy: str) -> int:
        """What the remat policy keeps of each layer: its input plus the tags it saves."""
        saved = REMAT_SAVES[policy]
        if saved is None:  # no remat: every intermediate stays alive
            return self.layer_working_set
        return self.residual + sum(self.tag_bytes(t) for t in saved)

    def loss_bytes(self, impl: str, n_exits: int, chunk_tokens: int) -> int:
        """The multi-exit loss kept for the backward pass (`chunk_tokens`: this device's
        tokens of one chunk)."""
        if impl == "plain":  # float32 logits of each exit kept (and their gradient at the peak)
            return n_exits * self.n * self.v * 4 + self.n * self.v * 4
        # one chunk of logits, softmax and d logits and the float32 head-gradient accumulator
        # (soft_jax/chunked_loss.py; its d-hidden buffer is the exit buffer's gradient)
        return 3 * chunk_tokens * self.v * 4 + self.d * self.v * 4


def _activations(c: LlamaConfig, mesh: dict, rules, rows: int, seq: int,
                 attention: str) -> Activations:
    table = dict(rules)

    def split_by(logical, size):  # per-device size of an activation dim under the rules
        axes = table.get(logical)
        axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
        k = math.prod(mesh[a] for a in axes if a in mesh)
        return size // k if k and size % k == 0 else size

    heads = split_by("activation_heads", c.num_heads)
    hd = c.kv_head_dim
    scores = 2 * rows * heads * seq * seq * 4 if attention == "xla" else 0
    if c.sliding_window is not None:  # an explicit [rows, 1, seq, seq] bool mask
        scores += rows * seq * seq
    return Activations(n=rows * seq, itemsize=_nbytes(c.dtype), d=c.hidden_size,
                       d_act=split_by("activation_embed", c.hidden_size), q_w=heads * hd,
                       kv_w=split_by("activation_kv_heads", c.num_kv_heads) * hd,
                       f_w=split_by("activation_mlp", c.intermediate_size), qk_norm=c.qk_norm,
                       v=split_by("activation_vocab", c.vocab_size), scores=int(scores))


def plan(config: LlamaConfig, mesh: dict, batch: int, seq: int, *, grad_accum: int = 1,
         mode: str = "soft", rules=shd.RULES, loss_impl: str = "auto",
         chunk_tokens: int | None = None, attention: str = "auto",
         backend: str = "gpu") -> Plan:
    """The per-device memory plan (bytes) of one step; `mesh` = {axis: size}."""
    mesh = {a: int(mesh.get(a, 1)) for a in shd.MESH_AXES}
    c = config
    params, axes = abstract_params(c)
    micro = batch // grad_accum
    bspec = shd.logical_to_spec(shd.BATCH_AXES, (micro, seq), mesh, rules)
    rows = shd.shard_shape((micro, seq), bspec, mesh)[0]
    in_spec = shd.logical_to_spec(shd.BATCH_AXES, (batch, seq), mesh, rules)
    in_rows = shd.shard_shape((batch, seq), in_spec, mesh)[0]
    attention = _attention(c, attention, backend)
    acts = _activations(c, mesh, rules, rows, seq, attention)
    e = len(train_exits(c, mode))
    frozen_body = mode == "ict"  # no gradient flows through the layers: nothing is saved
    state = state_bytes(params, axes, mesh, rules, mode)
    items = {**state,
             "grad_accumulator": state["grads"] if grad_accum > 1 else 0,
             "batch": sum(BATCH_KEYS.values()) * in_rows * seq,
             "layers": 0 if frozen_body else c.num_layers * acts.saved_per_layer(c.remat_policy),
             "exit_buffer": (1 if frozen_body else 2) * e * acts.residual,
             "compute_copy": 0 if frozen_body else _compute_copy(c, params, axes, mesh, rules),
             "embed_head": 0 if frozen_body else _embed_head_bytes(c, mesh, rules)}
    chunk = int(chunk_tokens or default_chunk_tokens(c.vocab_size, backend))
    impl = resolve_loss_impl(loss_impl, e, micro * seq, chunk, c.vocab_size, backend)
    items["loss"] = acts.loss_bytes(impl, e, rows * chunk_positions(chunk, micro, seq))
    # one layer's weights, all-gathered over fsdp (still split over tensor), compute dtype
    gathered = param_bytes({"layers": params["layers"]}, axes, mesh, _gathered_rules(rules))
    layer_params = gathered // c.num_layers // _nbytes(c.param_dtype) * acts.itemsize
    transient = {"layer_recompute": acts.layer_forward_set if frozen_body
                 else acts.layer_working_set,
                 "fsdp_gather": 2 * layer_params if mesh["fsdp"] > 1 else layer_params}
    dp = mesh["data"] * mesh["fsdp"]
    return Plan(config=c, mesh=mesh, batch=batch, seq=seq, grad_accum=grad_accum, mode=mode,
                rows_per_device=rows, batch_split=rows * dp == micro, loss_impl=impl,
                chunk_tokens=chunk, attention=attention, items=items, transient=transient,
                num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def _compute_copy(c: LlamaConfig, params, axes, mesh: dict, rules) -> int:
    """The layer stack cast to the compute dtype once per step, sharded like the params
    (XLA hoists the cast out of the layer scan)."""
    ratio = _nbytes(c.dtype) / _nbytes(c.param_dtype)
    layers = param_bytes({"layers": params["layers"]}, axes, mesh, rules)
    return int(layers * ratio) if ratio < 1 else 0


def _embed_head_bytes(c: LlamaConfig, mesh: dict, rules) -> int:
    """The embedding table gathered over fsdp for the lookup (param dtype) with its
    full-size gradient before the reduce-scatter, and the LM head gathered in the compute
    dtype for the loss."""
    table = _per_device(("vocab", None), (c.vocab_size, c.hidden_size), mesh, rules, 1)
    return table * (2 * _nbytes(c.param_dtype) + _nbytes(c.dtype))


def _gathered_rules(rules):
    return tuple((k, None if k == "embed" else v) for k, v in rules)


def _attention(c: LlamaConfig, attention: str, backend: str) -> str:
    """The attention kernel the training step traces (layers.attention_impl) unless forced."""
    if attention != "auto":
        return attention
    return attention_impl(c, _TRAIN_MASKED, c.compute_dtype, backend)


# ------------------------------------------------------------------------------- CLI
def parse_mesh(text: str, num_devices: int | None = None) -> dict:
    """"fsdp=8", "fsdp=2,tensor=4", "data=2xfsdp=2xtensor=2" -> {axis: size}."""
    out = {a: 1 for a in shd.MESH_AXES}
    for part in text.replace("x", ",").replace(" ", "").split(","):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"--mesh {text!r}: expected axis=size items, e.g. fsdp=8")
        k, val = part.split("=", 1)
        if k not in out:
            raise ValueError(f"--mesh: unknown axis {k!r}; axes: {shd.MESH_AXES}")
        out[k] = int(val)
    if -1 in out.values():
        if num_devices is None:
            raise ValueError("--mesh with -1 needs --devices N")
        out = shd.resolve_mesh_shape(out, num_devices).sizes
    return out


def _gib(b) -> str:
    return f"{b / GiB:9.2f}"


def format_plan(p: Plan, device_gib: float | None = None, usable: float = 0.9,
                margin: float = ESTIMATE_MARGIN, chip: str | None = None) -> str:
    """The plan as a table; with `device_gib`, the verdict against usable x device_gib,
    TIGHT where the estimate's own error (`margin`) could put it on either side."""
    c = p.config
    n_dev = math.prod(p.mesh.values())
    mesh = " x ".join(f"{a}={s}" for a, s in p.mesh.items() if s > 1) or "1 device"
    exits = p.exits
    lines = [
        f"soft_jax memory plan: {p.num_params / 1e9:.2f}B params, {c.num_layers} layers, "
        f"mode {p.mode}, exits {','.join(map(str, exits))}",
        f"mesh {mesh} ({n_dev} devices); batch {p.batch} x {p.seq} tokens, grad_accum "
        f"{p.grad_accum}: {p.rows_per_device:g} rows per device per micro-batch",
        f"params {c.param_dtype}, compute {c.dtype}, remat {c.remat_policy}, loss {p.loss_impl}"
        + (f" ({p.chunk_tokens}-token chunks)" if p.loss_impl == "chunked" else "")
        + f", attention {p.attention}",
    ]
    if not p.batch_split:
        lines.append(f"WARNING: the micro-batch of {p.batch // p.grad_accum} rows does not "
                     f"divide over data x fsdp = {p.mesh['data'] * p.mesh['fsdp']}: it is "
                     "replicated (every device computes every row); lower grad_accum or "
                     "raise the batch")
    label = {
        "params": f"params ({c.param_dtype} master weights)",
        "grads": "gradients",
        "optimizer": "AdamW mu + nu",
        "batch": "batch inputs",
        "grad_accumulator": f"gradient accumulator (grad_accum {p.grad_accum})",
        "layers": f"saved activations ({c.num_layers} layers)",  # remat: in the header
        "exit_buffer": f"exit hidden states + grad ({len(exits)} exits)",
        "compute_copy": f"layer weights in {c.dtype} (the step's cast)",
        "embed_head": "embedding + LM head gathered (+ embedding grad)",
        "loss": f"loss ({p.loss_impl})",
    }
    lines.append(f"{'per device':<52}{'GiB':>9}")
    for k, b in p.items.items():
        if b or k not in ("grad_accumulator", "compute_copy", "embed_head"):
            lines.append(f"  {label[k]:<50}{_gib(b)}")
    tl = {"layer_recompute": "peak transient: one layer's backward working set",
          "fsdp_gather": "peak transient: FSDP-gathered layer weights"}
    for k, b in p.transient.items():
        lines.append(f"  {tl[k]:<50}{_gib(b)}")
    lines.append(f"  {'total (kept + largest transient)':<50}{_gib(p.total)}")
    if device_gib:
        cap = device_gib * usable
        what = (f"TPU {chip}: {device_gib:g} GiB per chip as its compiler counts it"
                if chip else f"device {device_gib:g} GiB x {usable:.2f} usable")
        lines.append(f"{what} = {cap:.2f} GiB: {verdict(p.total / GiB, cap, margin)} "
                     f"({cap - p.total / GiB:+.2f} GiB headroom)")
        if not chip:
            lines.append("  (JAX on GPU preallocates 75% by default: set XLA_PYTHON_CLIENT_"
                         f"MEM_FRACTION={usable:.2f} to use what is counted here)")
    return "\n".join(lines)


def verdict(total_gib: float, cap_gib: float, margin: float) -> str:
    """FITS / DOES NOT FIT when the estimate is clear of the limit by its error `margin`
    (a fraction), else TIGHT."""
    if total_gib * (1 + margin) <= cap_gib:
        return "FITS"
    if total_gib > cap_gib * (1 + margin):
        return "DOES NOT FIT"
    return (f"TIGHT: within the estimate's +-{margin:.0%} of the limit (the TPU compiler "
            "decides: soft-jax compile)")
