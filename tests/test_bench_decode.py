"""bench/decode.py end to end on a tiny random model: every row present, floor first, JSON."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "decode.py"


def test_decode_bench_rows_and_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    bench.main(["--preset", "tiny-random", "--exits", "2,4", "--new-tokens", "4", "--repeats",
                "1", "--bandwidth-mib", "4", "--prompt-len", "6", "--host-loop", "--json", str(out)])
    rows = json.loads(out.read_text())
    key = {(r["system"], r["mode"], r["exit"]): r for r in rows}
    assert rows[0]["mode"] == "floor" and rows[0]["weight_bytes"] > 0
    for k in [("soft_jax", "greedy", None), ("soft_jax", "greedy", 2),
              ("soft_jax", "speculative", 2), ("soft_jax", "speculative-host-loop", 2),
              ("soft_jax", "dynamic", None),
              ("transformers", "eager", None), ("transformers", "static", None),
              ("transformers", "assistant_early_exit", 2)]:
        assert k in key, k
    for r in rows:
        assert r["ms_per_token"] > 0 and set(r) >= {"system", "mode", "exit",
                                                    "identical_to_greedy"}
    assert key[("soft_jax", "greedy", None)]["speedup_vs_greedy"] == 1.0
    # greedy-lossless modes reproduce full greedy; the sub-model alone need not
    for mode in ("speculative", "speculative-host-loop"):
        assert key[("soft_jax", mode, 2)]["identical_to_greedy"] is True
    assert 0 <= key[("soft_jax", "speculative", 2)]["acceptance_rate"] <= 1
    assert 2 <= key[("soft_jax", "dynamic", None)]["mean_exit"] <= 4
    assert all(r["tokens"] == 4 for r in rows[1:])
    # transformers runs the same weights: its greedy tokens equal soft_jax's
    assert key[("transformers", "eager", None)]["identical_to_greedy"] is True
