"""The ahead-of-time TPU compile (`soft-jax compile`) on the real TPU compiler (libtpu), no TPU
attached: the tiny config's SoFT and SFT steps on a 4-chip v5e and on two slices of it, an
oversized batch reported as an OOM, `--fit`, generation; topology names; and no libtpu
noise from soft_jax on a host without TPU chips."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soft_jax.cli.compile import main
from soft_jax.train.compile import parse_topology
from soft_jax.utils.platforms import choose_platforms, tpu_chips_on_host

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu (the TPU compiler) is not installed: pip install -r requirements.txt")
ROW_FIELDS = ("mode", "topology", "peak_gib", "hbm_gib", "fits", "compile_s", "argument_gib",
              "output_gib", "temp_gib", "alias_gib", "model_tflops", "compiled_tflops",
              "collectives", "mesh", "remat", "grad_accum")


def compile_cli(tmp_path, *args) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run `soft-jax compile --config configs/tiny.py ARGS --json`; (process, rows)."""
    out = tmp_path / "rows.json"
    out.unlink(missing_ok=True)
    p = subprocess.run([sys.executable, "-m", "soft_jax", "compile", "--config", "configs/tiny.py",
                        *args, "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    return p, json.loads(out.read_text()) if out.is_file() else []


def tokens_per_chip(row: dict) -> int:
    return row["batch"] * row["seq"] // row["chips"]  # the tiny config's mesh: data = -1


@needs_libtpu
@pytest.mark.parametrize("slices", [1, 2])
def test_soft_and_sft_steps_compile_for_a_slice_and_for_two(tmp_path, slices):
    extra = ["--slices", "2", "--config.mesh.dcn_data=2"] if slices == 2 else []
    p, rows = compile_cli(tmp_path, "--topology", "v5e-4", "--compare", "sft", *extra)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Failed to find host bounds" not in p.stderr and "TPU_WORKER" not in p.stderr
    soft, sft = rows
    assert (soft["mode"], sft["mode"]) == ("soft", "sft")
    for r in rows:
        assert set(ROW_FIELDS) <= set(r), set(ROW_FIELDS) - set(r)
        assert r["topology"] == "v5e-4" and r["slices"] == slices and r["chips"] == 4 * slices
        assert r["hbm_gib"] == 15.75 and r["fits"] and 0 < r["peak_gib"] < r["hbm_gib"]
        assert r["peak_gib"] == pytest.approx(r["argument_gib"] + r["output_gib"]
                                              + r["temp_gib"] - r["alias_gib"])
        assert r["compile_s"] > 0 and r["model_tflops"] > 0 and r["mesh"] == f"data={4 * slices}"
    assert soft["exits"] == [2, 3, 4] and sft["exits"] == [4]
    assert "soft/sft: peak" in p.stdout
    # The SoFT/SFT bound. Beyond SFT, SoFT keeps each extra exit's hidden state and its
    # gradient (float32 at most) and the loss holds one exit's float32 logits at a time (the
    # plain loss) or one chunk (the chunked one): never a logits buffer per exit, which
    # would add (E - 1) x tokens x vocab x 4 bytes and break this.
    t, d, v, extra_exits = tokens_per_chip(soft), 64, 1024, 2
    bound = extra_exits * 2 * t * d * 4 + t * v * 4
    assert (soft["peak_gib"] - sft["peak_gib"]) * 2 ** 30 <= bound, (soft, sft)


@needs_libtpu
def test_an_oversized_batch_is_an_oom_result_with_exit_3(tmp_path):
    p, rows = compile_cli(tmp_path, "--topology", "v5e-4", "--config.batch_size=8192")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    (row,) = rows
    assert not row["fits"] and row["peak_gib"] is None
    assert "RESOURCE_EXHAUSTED" in row["oom"] and row["temp_gib"] > row["hbm_gib"]
    assert "OOM: RESOURCE_EXHAUSTED" in p.stdout


@needs_libtpu
def test_fit_picks_a_config_that_then_compiles(tmp_path):
    # A budget (--headroom) between the peaks of 2 and 1 rows of 1024 tokens per chip: the
    # search must reject the largest micro-batch (grad_accum 1) and take grad_accum 2.
    base = ["--topology", "v5e-4", "--config.data.seq_len=1024", "--config.batch_size=8"]
    p, rows = compile_cli(tmp_path, *base, "--fit", "--headroom", "0.99")
    assert p.returncode == 0, p.stdout + p.stderr
    tried = [ln for ln in p.stdout.splitlines() if ln.startswith("  tried ")]
    assert len(tried) == len(rows) == 2, p.stdout
    assert [r["fits"] for r in rows] == [False, True] and rows[1]["chosen"]
    flags = p.stdout.splitlines()[-1]
    assert flags == "fit: --config.model.remat_policy=none --config.grad_accum=2", p.stdout
    again, (row,) = compile_cli(tmp_path, *base, *flags.split()[1:])
    assert again.returncode == 0 and row["fits"] and row["grad_accum"] == 2, again.stdout


@needs_libtpu
def test_decode_compiles_greedy_and_speculative_generation(tmp_path):
    p, rows = compile_cli(tmp_path, "--topology", "v5e-4", "--decode", "--tensor", "2",
                          "--decode-batch", "2", "--max-len", "128")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["mode"] for r in rows] == ["decode-greedy", "decode-speculative"]
    for r in rows:
        assert r["fits"] and r["kv_cache_gib"] > 0 and r["mesh"] == "tensor=2"
        assert r["held_gib"] == r["peak_gib"] >= r["params_gib"] + r["kv_cache_gib"]


def test_bad_input_is_one_line_and_exit_2(capsys):
    tiny = str(ROOT / "configs" / "tiny.py")
    assert main(["--config", tiny, "--topology", "v9-8"]) == 2
    assert main(["--config", tiny, "--topology", "v5e-4", "--config.nope=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "--topology 'v9-8'" in err[0] and "config.nope" in err[1]


def test_topology_names_map_to_the_compilers_slices():
    cases = {"v5e-32": ("v5e:4x8", 32, "v5litepod-32"), "v5e-1": ("v5e:1x1", 1, "v5litepod-1"),
             "v4-32": ("v4:2x2x4", 16, "v4-32"), "v4-8": ("v4:2x2x1", 4, "v4-8"),
             "v5p-64": ("v5:2x4x4", 32, "v5p-64"), "v6e-64": ("v6e:8x8", 64, "v6e-64"),
             "v5litepod-16": ("v5e:4x4", 16, "v5litepod-16"),
             "v5e-256": ("v5e:16x16", 256, "v5litepod-256"),
             "v5p:4x4x12": ("v5:4x4x12", 192, "v5p-384")}
    for name, (compiler, chips, gcloud) in cases.items():
        t = parse_topology(name)
        assert (t.compiler_name, t.chips, t.accelerator_type) == (compiler, chips, gcloud)
    for bad in ("v5e-48", "v4-4", "v9-8", "v5e:4x4x4"):
        with pytest.raises(ValueError, match="--topology"):
            parse_topology(bad)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None or tpu_chips_on_host() > 0,
                    reason="needs libtpu installed on a host without TPU chips")
def test_soft_jax_leaves_the_tpu_out_where_there_is_none():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    p = subprocess.run([sys.executable, "-c", "import soft_jax, jax; "
                        "print(jax.config.jax_platforms, jax.devices()[0].platform)"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == "cpu" and "tpu" not in p.stdout.split()[0]
    assert "TPU" not in p.stderr and "host bounds" not in p.stderr, p.stderr
    assert choose_platforms({"JAX_PLATFORMS": "cpu"}) is None  # an explicit choice stays


@needs_libtpu
def test_planner_prints_the_compiled_peak_beside_its_estimate():
    p = subprocess.run([sys.executable, "-m", "soft_jax", "memory", "--preset", "tiny", "--mesh",
                        "data=4", "--batch", "8", "--seq", "256", "--topology", "v5e-4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TPU v5e: 15.75 GiB per chip as its compiler counts it" in p.stdout
    assert "TPU compiler (v5e-4): peak " in p.stdout and "the estimate" in p.stdout
