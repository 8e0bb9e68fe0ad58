"""Checkpoints are portable across topologies: a work dir trained on 4 devices (fsdp=4) and
one trained by 2 processes load in fresh 1-device processes through every consumer
(convert to-hf, generate, eval, model.init_from), equal to the weights the run held."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "portable_worker.py"


def run(args, devices=1):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    p = subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """{name: (work dir, trained params)}: fsdp=4 on 4 devices, and 2 processes x 2 devices."""
    root = tmp_path_factory.mktemp("portable")
    run([sys.executable, WORKER, "train", root / "fsdp4", 4], devices=4)
    run([sys.executable, ROOT / "launch" / "local.py", "--num-processes", "2",
         "--devices-per-process", "2", "--timeout", "280", "--", sys.executable, WORKER, "train",
         root / "procs2", 4])
    return {n: (root / n, dict(np.load(root / n / "trained.npz"))) for n in ("fsdp4", "procs2")}


def test_convert_to_hf_on_one_device(workdirs, tmp_path):
    from soft_jax.io.hf import load_hf

    for name, (wd, want) in workdirs.items():
        run([sys.executable, "-m", "soft_jax", "convert", "to-hf", "--ckpt", wd,
             "--out", tmp_path / name])
        _, params = load_hf(tmp_path / name)
        assert_same(params, want)


def test_generate_on_one_device(workdirs):
    import jax

    import soft_jax as sj
    from soft_jax.io.checkpoint import read_model_config, resolve_checkpoint

    for wd, want in workdirs.values():
        out = run([sys.executable, "-m", "soft_jax", "generate", "--ckpt", wd, "--prompt-ids",
                   "5,6,7", "--max-new-tokens", "4"]).stdout.splitlines()[-1]
        config = read_model_config(resolve_checkpoint(wd))
        params = jax.tree_util.tree_map_with_path(
            lambda k, _: want[jax.tree_util.keystr(k)],
            sj.init_params(config, jax.random.PRNGKey(0)))
        ref = sj.generate(config, params, [5, 6, 7], 4).tokens[0]
        assert json.loads(out)["tokens"] == ref


@pytest.mark.parametrize("consumer", ["eval", "init_from"])
def test_eval_and_init_from_on_one_device(workdirs, tmp_path, consumer):
    names = list(workdirs)
    run([sys.executable, WORKER, consumer, tmp_path / "got.npz",
         *[workdirs[n][0] for n in names]])
    got = np.load(tmp_path / "got.npz")
    for i, n in enumerate(names):
        assert_same({k[1:]: v for k, v in got.items() if k[0] == str(i)}, workdirs[n][1])


def assert_same(got, want: dict) -> None:
    """`got` (a params tree or a flat {keystr: array}) equals the flat `want`, leaf for leaf."""
    import jax

    flat = got if all(isinstance(k, str) and k.startswith("[") for k in got) else {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(got)}
    assert sorted(flat) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(flat[k], np.float32), v, err_msg=k)
