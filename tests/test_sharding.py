"""Sharding and multi-host: logical-axis rules, one step on five meshes, checkpoints across
meshes, and two real processes (jax.distributed over localhost, CPU collectives).

The pytest process keeps its single device; fake devices live only in subprocesses that run
this file as a script (`python tests/test_sharding.py mesh-worker|train-worker OUT`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import REASSOC, adam_divergence_bound

ROOT = Path(__file__).resolve().parents[1]
# opt level 0 halves XLA:CPU compile time; every mesh compared runs under the same flags
XLA_FAST = "--xla_backend_optimization_level=0"
MESHES = {  # name -> mesh sizes (8 fake devices; "1" uses the first device only)
    "1": {"data": 1},
    "data8": {"data": 8},
    "fsdp8": {"data": 1, "fsdp": 8},
    "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def _run(args, env_extra, timeout=600):
    env = {**os.environ, **env_extra}
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc


# ------------------------------------------------------------------ rules (no devices needed)
def test_rules_fall_back_to_replication_when_a_dim_does_not_divide():
    from jax.sharding import PartitionSpec as P

    from soft_jax.parallel.sharding import logical_to_spec, make_rules

    mesh = {"data": 1, "fsdp": 2, "tensor": 4}
    # 2 kv heads on tensor=4: replicated on that dim, no crash
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (4, 32, 2, 8),
                           mesh) == P(None, "fsdp")
    assert logical_to_spec(("layers", "embed", "q_heads", "head_dim"), (4, 32, 4, 8),
                           mesh) == P(None, "fsdp", "tensor")
    # batch over data x fsdp, falling back to a prefix that divides, then to replication
    big = {"data": 2, "fsdp": 4, "tensor": 1}
    assert logical_to_spec(("batch", "activation_length"), (16, 8), big) == P(("data", "fsdp"))
    assert logical_to_spec(("batch", "activation_length"), (6, 8), big) == P("data")
    assert logical_to_spec(("batch", "activation_length"), (3, 8), big) == P()
    # a mesh axis is used once per value; size-1 axes are left out
    assert logical_to_spec(("embed", "embed"), (8, 8), big) == P("fsdp")
    assert logical_to_spec(("vocab", "embed"), (128, 32), {"data": 8}) == P()
    # the scanned layer axis stays unsharded: a rule for it is refused
    with pytest.raises(ValueError, match="'layers' stays unsharded"):
        make_rules([("layers", "fsdp")])
    with pytest.raises(ValueError, match="unknown logical axis"):
        make_rules([("no_such_axis", "fsdp")])
    rules = make_rules([("activation_embed", "tensor")])
    assert logical_to_spec(("batch", "activation_length", "activation_embed"), (4, 8, 32),
                           mesh, rules) == P("fsdp", None, "tensor")


def test_every_param_and_adam_moment_has_logical_axes():
    import jax
    import optax

    from soft_jax.model.config import preset
    from soft_jax.model.transformer import init_params, param_axes
    from soft_jax.parallel.sharding import logical_axes_for_path, tree_specs

    config = preset("tiny", num_exit_heads=2)  # ICT heads too
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    axes = param_axes(config)
    opt = jax.eval_shape(optax.adamw(1e-3).init, params)
    for tree in (params, opt):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            if leaf.ndim:
                names = logical_axes_for_path(path, leaf.ndim, axes)
                assert names is not None, jax.tree_util.keystr(path)
                if "layers" in jax.tree_util.keystr(path):
                    assert names[0] == "layers"
    mesh = {"data": 1, "fsdp": 4, "tensor": 2}
    specs = tree_specs(params, axes, mesh)
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    for name, spec in flat.items():  # the layer axis is never sharded
        if "layers" in name and len(spec):
            assert spec[0] is None, (name, spec)
    assert flat["['layers']['mlp']['down_proj']['kernel']"] == jax.sharding.PartitionSpec(
        None, "tensor", "fsdp")
    assert flat["['embed']['embedding']"] == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert flat["['exit_heads']['kernel']"] == jax.sharding.PartitionSpec(None, "fsdp",
                                                                          "tensor")


def test_a_renamed_module_stays_sharded_and_an_unannotated_param_is_an_error(monkeypatch):
    """Logical axes travel with the params: renaming a layer's modules keeps every one of its
    weights sharded, and a weight created without logical axes is refused by name."""
    import flax.linen as nn
    import jax

    from soft_jax.model import layers, transformer
    from soft_jax.model.config import preset
    from soft_jax.parallel.sharding import boxed_axes, tree_specs

    class RenamedLayer(layers.DecoderLayer):
        def setup(self):
            cfg = self.config
            self.norm_a = layers.RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype)
            self.self_attention = layers.Attention(cfg)
            self.norm_b = layers.RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype)
            self.feed_forward = layers.MLP(cfg)

        def __call__(self, x, cos, sin, mask=None, cache=None, cache_index=None):
            a, cache = self.self_attention(self.norm_a(x), cos, sin, mask, cache, cache_index)
            return x + a + self.feed_forward(self.norm_b(x + a)), cache

    monkeypatch.setattr(transformer, "DecoderLayer", RenamedLayer)
    config = preset("tiny", num_layers=2, exits=(1, 2))
    params = jax.eval_shape(lambda: transformer.init_params(config, jax.random.PRNGKey(0)))
    specs = tree_specs(params, transformer.param_axes(config), {"fsdp": 4, "tensor": 2})
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    P = jax.sharding.PartitionSpec
    assert flat["['layers']['feed_forward']['down_proj']['kernel']"] == P(None, "tensor", "fsdp")
    assert flat["['layers']['self_attention']['q_proj']['kernel']"] == P(None, "fsdp", "tensor")
    assert all(len(s) for n, s in flat.items() if "kernel" in n or "embedding" in n), flat

    class Unannotated(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, use_bias=False, name="plain_proj")(x)

    x = jax.ShapeDtypeStruct((1, 8), "float32")
    boxed = jax.eval_shape(lambda x: Unannotated().init(jax.random.PRNGKey(0), x), x)
    with pytest.raises(ValueError, match=r"plain_proj\.kernel .*no logical axes"):
        boxed_axes(boxed)


def test_mesh_sizes_resolve_and_errors_name_the_problem():
    from soft_jax.parallel.sharding import resolve_mesh_shape

    assert resolve_mesh_shape({"data": -1}, 8).sizes == {"data": 8, "fsdp": 1, "tensor": 1}
    assert resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8).sizes == {
        "data": 1, "fsdp": 4, "tensor": 2}
    s = resolve_mesh_shape({"data": 2, "fsdp": 4, "dcn_data": 2}, 8)
    assert (s.dcn_data, s.dcn_fsdp) == (2, 1)
    with pytest.raises(ValueError, match="has 6 devices but 8"):
        resolve_mesh_shape({"data": 2, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="dcn_fsdp=3 must divide"):
        resolve_mesh_shape({"fsdp": 8, "dcn_fsdp": 3}, 8)


def test_distributed_settings_come_from_config_or_environment():
    from soft_jax.parallel.distributed import detect

    assert detect(None, {}).source == "single"
    env = {"SOFT_JAX_COORDINATOR": "10.0.0.1:1234", "SOFT_JAX_NUM_PROCESSES": "4",
           "SOFT_JAX_PROCESS_ID": "3", "SOFT_JAX_LOCAL_DEVICE_IDS": "0,1"}
    s = detect(None, env)
    assert (s.source, s.coordinator, s.num_processes, s.process_id, s.local_device_ids) == (
        "explicit", "10.0.0.1:1234", 4, 3, (0, 1))
    cfg = {"coordinator": "h:1", "num_processes": 2, "process_id": 0, "mode": "auto"}
    assert detect(cfg, env).coordinator == "h:1"  # config wins over the environment
    with pytest.raises(ValueError, match=r"missing \['process_id'\]"):
        detect(None, {"SOFT_JAX_COORDINATOR": "h:1", "SOFT_JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="not in"):
        detect({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {})
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0",
             "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"}
    assert detect(None, slurm).source == "slurm"
    assert detect(None, {**slurm, "SLURM_STEP_NUM_TASKS": "1"}).source == "single"
    assert detect(None, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}).source == "single"  # sbatch
    assert detect(None, {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}).source == "tpu"
    assert detect(None, {"TPU_WORKER_HOSTNAMES": "a"}).source == "single"
    assert detect({"mode": "off"}, slurm).source == "single"
    assert detect({"mode": "on"}, {}).source == "forced"


# ------------------------------------------------------------------ 8 fake devices
def _tiny(num_layers=4):
    from soft_jax.model.config import preset

    return preset("tiny", vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_layers=num_layers, num_heads=4, num_kv_heads=2,
                  exits=tuple(range(2, num_layers + 1)))


def _batches(n, b=8, t=32, vocab=128):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        seg = np.where(np.arange(t) < t // 2, 1, 2) * np.ones((b, 1), np.int32)
        pos = np.where(seg == 1, np.arange(t), np.arange(t) - t // 2).astype(np.int32)
        out.append({"input_ids": rng.integers(0, vocab, (b, t)).astype(np.int32),
                    "targets": rng.integers(0, vocab, (b, t)).astype(np.int32),
                    "loss_mask": (rng.random((b, t)) > 0.2).astype(np.float32),
                    "positions": pos, "segment_ids": seg.astype(np.int32)})
    return out


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def mesh_worker(out: Path) -> None:
    """One jitted train step (x3 batches) on every mesh in MESHES, from the same params;
    then an Orbax checkpoint written on fsdp=8 restored onto fsdp=2 x tensor=4 and onto one
    device. Writes mesh.json (+ npz of the params after the steps per mesh)."""
    import jax
    import jax.numpy as jnp

    from soft_jax.parallel import sharding as shd
    from soft_jax.io.checkpoint import TrainCheckpoints, load_params
    from soft_jax.model.transformer import init_params, param_axes
    from soft_jax.train.loop import (StepSettings, TrainState, abstract_state, make_optimizer,
                                     make_partitioning, make_train_step, trainable_keys)
    from soft_jax.train.run_config import default_config

    assert jax.device_count() == 8
    cfg = default_config()
    cfg.optimizer.lr, cfg.optimizer.warmup_steps, cfg.total_steps = 1e-3, 1, 10
    config = _tiny()
    params0 = jax.tree.map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
    tx, schedule = make_optimizer(cfg)
    keys = trainable_keys(params0, cfg.mode)
    batches = _batches(3)
    result = {"meshes": {}}
    states = {}
    for name, sizes in MESHES.items():
        mesh = shd.build_mesh(sizes, jax.devices()[:1] if name == "1" else None)
        part = make_partitioning(mesh, shd.RULES, abstract_state(config, tx, keys, params0),
                                 8, 32, param_axes(config))
        params = shd.place(params0, part.state.params)
        state = TrainState(jax.device_put(jnp.int32(0), part.state.step), params,
                           jax.jit(tx.init, out_shardings=part.state.opt_state)(params))
        step = make_train_step(config, StepSettings.from_config(cfg), tx, schedule, keys, part)
        losses, gnorms, lrs = [], [], []
        for i, b in enumerate(batches):
            gb = shd.global_batch(lambda lo, hi, b=b: {k: v[lo:hi] for k, v in b.items()},
                                  part.batch, 8)
            state, metrics = step(state, gb)
            losses.append(float(metrics["loss"]))
            gnorms.append(float(metrics["grad_norm"]))
            lrs.append(float(metrics["lr"]))
            if i == 0:  # Adam's first moment after one step: (1 - b1) x the clipped gradient
                np.savez(out / f"mu1_{name}.npz", **_flat(state.opt_state[1][0].mu))
        shards = {}
        for tree_name, tree in (("params", state.params),
                                ("mu", state.opt_state[1][0].mu)):
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                shards[f"{tree_name}{jax.tree_util.keystr(path)}"] = {
                    "spec": str(leaf.sharding.spec), "shape": list(leaf.shape),
                    "shard": list(leaf.addressable_shards[0].data.shape),
                    "num_devices": len(leaf.sharding.device_set),
                    "bytes": int(leaf.addressable_shards[0].data.nbytes)}
        result["meshes"][name] = {
            "losses": losses, "grad_norms": gnorms, "lrs": lrs, "shards": shards,
            "batch_spec": str(part.batch.spec),
            "batch_shard": list(gb["input_ids"].addressable_shards[0].data.shape)}
        states[name] = state
        np.savez(out / f"params_{name}.npz", **_flat(state.params))
    # checkpoint written on 8-way fsdp ...
    src = states["fsdp8"]
    ckpts = TrainCheckpoints(out / "ckpt" / "checkpoints", keep=1, async_save=False)
    ckpts.save(3, src.params, src.opt_state, {"step": 3, "model": config.to_dict()})
    ckpts.wait()
    (out / "ckpt" / "model_config.json").write_text(json.dumps(config.to_dict()))
    want_p, want_o = _flat(src.params), _flat(src.opt_state)
    restored = {}
    # ... restored onto fsdp=2 x tensor=4 (train state) and onto one device (params only)
    mesh = shd.build_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    part = make_partitioning(mesh, shd.RULES, abstract_state(config, tx, keys, params0), 8, 32,
                             param_axes(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state(config, tx, keys, params0), part.state)
    p, o, meta = ckpts.restore(3, target.params, target.opt_state)
    ckpts.close()
    q = p["layers"]["attn"]["q_proj"]["kernel"]
    k = p["layers"]["attn"]["k_proj"]["kernel"]
    restored["fsdp2_tensor4"] = {
        "params_max_diff": max(float(np.abs(want_p[n] - v).max()) for n, v in _flat(p).items()),
        "opt_max_diff": max(float(np.abs(want_o[n] - v).max()) for n, v in _flat(o).items()),
        "q_spec": str(q.sharding.spec), "q_shard": list(q.addressable_shards[0].data.shape),
        "k_spec": str(k.sharding.spec), "meta_step": meta["step"]}
    one = shd.build_mesh({"data": 1}, jax.devices()[:1])
    _, p1 = load_params(out / "ckpt", mesh=one)
    restored["one_device"] = {
        "params_max_diff": max(float(np.abs(want_p[n] - v).max()) for n, v in _flat(p1).items()),
        "devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(p1)})}
    result["restore"] = restored
    (out / "mesh.json").write_text(json.dumps(result, indent=1))


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh8")
    _run([str(Path(__file__)), "mesh-worker", str(out)],
         {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {XLA_FAST}"})
    return json.loads((out / "mesh.json").read_text()), out


def test_one_step_matches_on_every_mesh(mesh_run):
    res, out = mesh_run
    ref_run = res["meshes"]["1"]
    ref, ref_mu = np.load(out / "params_1.npz"), np.load(out / "mu1_1.npz")
    param_bound = adam_divergence_bound(ref_run["lrs"])  # Adam's sign noise, see tolerances
    worst = {}
    for name, r in res["meshes"].items():
        assert r["lrs"] == ref_run["lrs"], name  # the schedule is exact
        # before the optimizer: losses, gradient norms and the gradients (Adam's first moment
        # after one step) agree to float32 reassociation
        np.testing.assert_allclose(r["losses"], ref_run["losses"], rtol=REASSOC, err_msg=name)
        np.testing.assert_allclose(r["grad_norms"], ref_run["grad_norms"], rtol=REASSOC,
                                   err_msg=name)
        mu = np.load(out / f"mu1_{name}.npz")
        for k in ref_mu.files:
            np.testing.assert_allclose(mu[k], ref_mu[k], rtol=0, err_msg=f"{name} {k}",
                                       atol=REASSOC * np.abs(ref_mu[k]).max())
        got = np.load(out / f"params_{name}.npz")
        worst[name] = max(float(np.abs(got[k] - ref[k]).max()) for k in ref.files)
        assert worst[name] <= param_bound, (name, worst[name], param_bound)
    print(f"max abs param diff vs 1 device after 3 steps (bound {param_bound:.2e}):", worst)
    assert len(set(ref_run["losses"])) == 3  # three different batches, three different losses


def test_params_and_adam_moments_are_really_sharded(mesh_run):
    res, _ = mesh_run
    m = res["meshes"]
    q = "['layers']['attn']['q_proj']['kernel']"  # [L=4, D=32, heads=4, hd=8]
    k = "['layers']['attn']['k_proj']['kernel']"  # [4, 32, kv=2, 8]
    down = "['layers']['mlp']['down_proj']['kernel']"  # [4, F=64, D=32]
    emb = "['embed']['embedding']"  # [V=128, D=32]
    for tree in ("params", "mu"):  # optimizer moments carry the params' shardings
        assert m["data8"]["shards"][tree + q]["shard"] == [4, 32, 4, 8]  # replicated
        assert m["fsdp8"]["shards"][tree + q]["spec"] == "P(None, 'fsdp')"
        assert m["fsdp8"]["shards"][tree + q]["shard"] == [4, 4, 4, 8]
        assert m["fsdp8"]["shards"][tree + emb]["shard"] == [128, 4]
        t = m["fsdp4_tensor2"]["shards"]
        assert t[tree + q]["spec"] == "P(None, 'fsdp', 'tensor')"
        assert t[tree + q]["shard"] == [4, 8, 2, 8]
        assert t[tree + k]["shard"] == [4, 8, 1, 8]
        assert t[tree + down]["shard"] == [4, 32, 8]
        assert t[tree + emb]["shard"] == [64, 8]
        assert m["data2_fsdp2_tensor2"]["shards"][tree + q]["shard"] == [4, 16, 2, 8]
    for name in ("fsdp8", "fsdp4_tensor2"):  # 8-way: every big leaf is 1/8 per device
        sh = m[name]["shards"]
        total = sum(np.prod(v["shape"]) * 4 for v in sh.values() if v["shape"])
        per_dev = sum(v["bytes"] for v in sh.values() if v["shape"])
        assert per_dev < total / 6, (name, per_dev, total)
    assert m["data8"]["batch_spec"] == "P('data',)"
    assert m["data2_fsdp2_tensor2"]["batch_spec"] == "P(('data', 'fsdp'),)"
    assert m["fsdp8"]["batch_shard"] == [1, 32]


def test_checkpoint_restores_onto_another_mesh(mesh_run):
    res, _ = mesh_run
    r = res["restore"]
    print("restore fsdp=8 -> fsdp=2 x tensor=4 / 1 device:", r)
    assert r["fsdp2_tensor4"]["params_max_diff"] == 0.0
    assert r["fsdp2_tensor4"]["opt_max_diff"] == 0.0
    assert r["fsdp2_tensor4"]["q_spec"] == "P(None, 'fsdp', 'tensor')"
    assert r["fsdp2_tensor4"]["q_shard"] == [4, 16, 1, 8]
    assert r["fsdp2_tensor4"]["k_spec"] == "P(None, 'fsdp')"  # 2 kv heads, tp=4
    assert r["fsdp2_tensor4"]["meta_step"] == 3
    assert r["one_device"] == {"params_max_diff": 0.0, "devices": [1]}


# ------------------------------------------------------------------ two real processes
def _text_rows(path: Path, n=48):
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "one", "two", "three",
             "cat", "dog", "runs", "sleeps", "and", "the"]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(8, 20)))})
                    + "\n")


def _two_proc_config(workdir: Path, data_file: Path, steps: int, **mesh):
    from soft_jax.train.run_config import default_config

    c = default_config()
    c.workdir = str(workdir)
    c.model.overrides = {"vocab_size": 0, "hidden_size": 32, "intermediate_size": 64,
                         "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "exits": (1, 2)}
    c.exits = (1, 2)
    c.data.format, c.data.source, c.data.eval_source = "text", str(data_file), ""
    c.data.tokenizer, c.data.seq_len = "bpe:300", 48
    c.batch_size, c.total_steps, c.checkpoint_every, c.log_every = 8, steps, 2, 1
    c.grad_accum = 2  # micro-batches of 4 rows: still split over data x fsdp = 4
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-2, 1
    c.async_checkpointing = False
    for k, v in mesh.items():
        c.mesh[k] = v
    return c


def train_worker(out: Path) -> None:
    """Run by each of the 2 processes: a 6-step run on data=2 x fsdp=2 x tensor=2 (checkpoint
    at 2) that process 0 alone gets SIGTERM in at step 4 (both stop and checkpoint step 4),
    then resumed from step 4 on fsdp=4 x tensor=2. Run alone (one process, one device) it
    trains the same 6 steps straight through: the reference."""
    import jax
    from jax.experimental import multihost_utils

    from soft_jax.train.loop import train

    data = out / "data.jsonl"
    if "SOFT_JAX_NUM_PROCESSES" not in os.environ:  # not started by the launcher
        r = train(_two_proc_config(out / "ref", data, 6))
        (out / "ref.json").write_text(json.dumps({
            "devices": jax.device_count(), "losses": [h["loss"] for h in r["history"]],
            "lrs": [h["lr"] for h in r["history"]]}))
        np.savez(out / "ref_params.npz", **_flat(r["params"]))
        return
    def sigterm_on_process_0_at_step_4(step):
        if step == 4 and jax.process_index() == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    r1 = train(_two_proc_config(out / "wd", data, 6, data=2, fsdp=2, tensor=2),
               on_step=sigterm_on_process_0_at_step_4)
    assert r1["status"] == "interrupted" and r1["step"] == 4, r1  # on both processes
    r2 = train(_two_proc_config(out / "wd", data, 6, data=1, fsdp=4, tensor=2))
    assert r2["status"] == "done" and r2["step"] == 6
    params = multihost_utils.process_allgather(r2["params"], tiled=True)
    pid = jax.process_index()
    info = {"process_index": pid, "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "rows": [r1["batch_rows"], r2["batch_rows"]], "meshes": [r1["mesh"], r2["mesh"]],
            "losses": [h["loss"] for h in r1["history"] + r2["history"]],
            "steps": [h["step"] for h in r1["history"] + r2["history"]]}
    (out / f"proc{pid}.json").write_text(json.dumps(info))
    if pid == 0:
        np.savez(out / "params.npz", **_flat(params))


def test_two_processes_train_save_restore_match_single_process(tmp_path):
    _text_rows(tmp_path / "data.jsonl")
    env = {**os.environ, "XLA_FLAGS": XLA_FAST}  # the same XLA flags for both runs
    env.pop("JAX_PLATFORMS", None)
    worker = [sys.executable, str(Path(__file__)), "train-worker", str(tmp_path)]
    ref = subprocess.Popen(worker, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # single process, 1 device
    try:
        proc = _run([str(ROOT / "launch" / "local.py"), "--num-processes", "2",
                     "--devices-per-process", "4", "--platform", "cpu", "--timeout", "500",
                     "--", *worker], {"XLA_FLAGS": XLA_FAST})
        ref_out = ref.communicate(timeout=500)[0]
    finally:
        if ref.poll() is None:
            ref.kill()
    assert ref.returncode == 0, ref_out[-6000:]
    infos = [json.loads((tmp_path / f"proc{i}.json").read_text()) for i in range(2)]
    assert [i["process_index"] for i in infos] == [0, 1]
    assert all(i["process_count"] == 2 and i["devices"] == 8 and i["local_devices"] == 4
               for i in infos)
    # each process fed only its own half of every global batch
    assert infos[0]["rows"] == [[[0, 4]], [[0, 4]]] and infos[1]["rows"] == [[[4, 8]], [[4, 8]]]
    assert infos[0]["meshes"] == ["data=2 x fsdp=2 x tensor=2", "fsdp=4 x tensor=2"]
    assert infos[0]["steps"] == [1, 2, 3, 4, 5, 6]
    assert proc.stdout.count("resumed from step 4") == 1  # logged by process 0 only
    assert "[p1] step" not in proc.stdout and "[p0] step 6/6" in proc.stdout
    ckpt = tmp_path / "wd" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["4", "6"]
    ref_res = json.loads((tmp_path / "ref.json").read_text())
    assert ref_res["devices"] == 1
    # the same bounds as one step on every mesh: losses to reassociation, params to Adam's
    # largest possible steps (the saved and restored state itself is exact)
    np.testing.assert_allclose(infos[0]["losses"], ref_res["losses"], rtol=REASSOC)
    got, want = np.load(tmp_path / "params.npz"), np.load(tmp_path / "ref_params.npz")
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want.files)
    bound = adam_divergence_bound(ref_res["lrs"])
    print("2 processes x 4 devices vs 1 process x 1 device: losses", infos[0]["losses"],
          "ref", ref_res["losses"], f"max abs param diff {diff} (bound {bound:.2e})")
    assert diff <= bound
    assert ref_res["losses"][-1] < ref_res["losses"][0]


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    {"mesh-worker": mesh_worker, "train-worker": train_worker}[mode](out_dir)
