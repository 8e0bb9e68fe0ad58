"""The demo and the bench scripts run end to end on tiny shapes (seconds, not their defaults)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_bench_reports_sft_and_soft(tmp_path, capsys):  # --warmup 0 included
    out = tmp_path / "bench.json"
    bench("train_step").main(["--preset", "tiny", "--layers", "2", "--exits", "1,2",
                              "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "0",
                              "--peak-tflops", "1", "--in-process", "--json", str(out),
                              "--variants", "sft/plain,soft/chunked"])
    rows = json.loads(out.read_text())["rows"]
    assert rows["sft/plain"]["exits"] == [2] and rows["soft/chunked"]["exits"] == [1, 2]
    assert all(r["step_s"] > 0 and r["loss"] > 0 for r in rows.values())
    report = capsys.readouterr().out
    assert "FLOP-theoretic SoFT/SFT" in report and "| chunked | plain |" in report


def test_compile_time_bench_times_both_stacks(capsys):
    rows = bench("compile_time").main(["--layers", "1,2", "--exits-every", "1", "--hidden",
                                       "16", "--mlp", "32", "--seq", "8"])
    assert [(n, e, s) for n, e, s, _ in rows] == [(1, 1, True), (1, 1, False), (2, 2, True),
                                                  (2, 2, False)]
    assert all(t > 0 for *_, t in rows)
    assert "unrolled" in capsys.readouterr().out


@pytest.fixture
def tiny_demo_config(tmp_path):
    path = tmp_path / "demo_tiny.py"
    path.write_text(
        "from soft_jax.train.run_config import default_config\n\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.model.overrides = {'vocab_size': 0, 'hidden_size': 16, 'intermediate_size': 32,\n"
        "                         'num_heads': 2, 'num_kv_heads': 1}\n"
        "    c.exits = (2, 4)\n"
        "    c.data.max_rows, c.data.seq_len, c.data.tokenizer = 8, 512, 'bpe:260'\n"
        "    c.batch_size, c.eval_batches, c.checkpoint_every = 2, 1, 100\n"
        "    c.async_checkpointing = False\n"
        "    return c\n")
    return path


def test_demo_runs_soft_and_sft_and_writes_its_report(tiny_demo_config, tmp_path):
    from soft_jax.cli.demo import main

    summary = main(["--random-init", "--config", str(tiny_demo_config), "--steps", "1", "--out",
                    str(tmp_path / "demo")])
    assert set(summary["results"]) == {"SoFT", "SFT"}
    assert all(set(r) == {"2", "4"} for r in summary["results"].values())
    for name in ("results.json", "report.md", "per_exit.png"):
        assert (tmp_path / "demo" / name).is_file()
    assert "| 4 |" in (tmp_path / "demo" / "report.md").read_text()


@pytest.mark.slow
def test_compile_time_is_flat_in_depth_at_the_default_shape():
    # the README's claim at the bench's own defaults (4 and 32 layers; minutes of CPU)
    rows = bench("compile_time").main([])
    scanned = {n: t for n, _, s, t in rows if s}
    assert scanned[32] < 2 * scanned[4], scanned
