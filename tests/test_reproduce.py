"""The reproduction driver's plumbing: stage caching and locks, --report-only, ROUGE-L.
(The stages themselves are the library's train / eval / generate, tested elsewhere; the
real run is documented in docs/reproduction.md.)"""

import json
import os
import threading
import time

from soft_jax.cli.reproduce import main as reproduce_main
from soft_jax.reproduce import stages as R


def test_cached_runs_once_and_takes_over_a_stale_lock(tmp_path):
    calls = []
    path = tmp_path / "eval" / "x.json"
    path.parent.mkdir()
    (tmp_path / "eval" / "x.json.lock").write_text("999999999")  # its process is gone
    first = R.cached(path, "x", lambda: calls.append(1) or {"v": 1})
    again = R.cached(path, "x", lambda: calls.append(2) or {"v": 2})
    assert calls == [1] and first["v"] == again["v"] == 1 and "wall_s" in again
    assert json.loads(path.read_text())["v"] == 1
    assert not (tmp_path / "eval" / "x.json.lock").exists()


def test_cached_waits_for_a_stage_another_process_runs(tmp_path, monkeypatch):
    real_sleep = time.sleep
    monkeypatch.setattr(R.time, "sleep", lambda s: real_sleep(0.05))
    path = tmp_path / "y.json"
    (tmp_path / "y.json.lock").write_text(str(os.getppid()))  # a live process holds it

    def other_process_finishes():
        time.sleep(0.3)
        tmp = path.with_suffix(".tmp")  # written as cached() writes: atomically
        tmp.write_text(json.dumps({"v": "theirs"}))
        tmp.replace(path)

    threading.Thread(target=other_process_finishes).start()
    assert R.cached(path, "y", lambda: {"v": "ours"})["v"] == "theirs"


def test_report_only_lists_every_stage_not_done(tmp_path):
    reproduce_main(["--out", str(tmp_path), "--report-only"])
    text = (tmp_path / "report.md").read_text()
    assert "train sft, train soft, eval base loss" in text and "eval ict sortedness" in text
    assert not (tmp_path / "sft").exists()  # nothing was run


def test_stage_filter_and_rouge():
    assert R.stage_path(R.Path("/r"), "eval", "soft", "loss") == R.Path("/r/eval/soft/loss.json")
    assert R.rouge_l(["a b c d"], ["a b c d"]) == 1.0
    assert R.rouge_l(["x y"], ["a b"]) == 0.0


def _decoding(acc: float) -> dict:
    """A `decoding` task result with every row the reports read (synthetic timings)."""
    rows = [{"mode": "greedy", "exit": e, "label": f"greedy {e}", "ms_per_token": 10.0,
             "speedup": 1.0, "quality": 0.0, "correct": 0, "total": 2, "rouge_l": 0.1,
             "rejection_ratio": None, "acceptance": None, "mean_exit_layer": e,
             "identical_to_greedy": e == 30} for e in R.EXITS]
    rows += [{**rows[0], "mode": "speculative", "draft_exit": d, "label": f"speculative {d}",
              "acceptance": acc, "rejection_ratio": 1 - acc, "speedup": 0.8} for d in R.EXITS[:-1]]
    rows += [{**rows[0], "mode": "dynamic", "exit": "9:30", "thresholds": t, "label": f"dynamic {t}",
              "mean_exit_layer": 25.0} for t in ("paper", "0.5")]
    return {"prompts": 2, "max_new_tokens": 8, "rows": rows, "baseline_ms_per_token": 10.0,
            "baseline_ms_per_token_last": 13.0, "baseline_drift": 1.3,
            "acceptance": {str(d): acc for d in R.EXITS[:-1]}}


def test_study_report_tables_targets_and_projection(tmp_path):
    from soft_jax.reproduce.study import finished, score
    from soft_jax.reproduce.study_report import projected_speedup, write_study_report

    per_exit = {str(e): {"loss": 1.0 + (30 - e) / 10, "accuracy": 0.5, "ppl": 3.0} for e in R.EXITS}
    for name, acc in (("soft", 0.3), ("distill", 0.6)):
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "loss.json").write_text(json.dumps({"per_exit": per_exit}))
        (tmp_path / "eval" / name / "decoding.json").write_text(json.dumps(_decoding(acc)))
    (tmp_path / "distill" / "metrics.jsonl").parent.mkdir()
    (tmp_path / "distill" / "metrics.jsonl").write_text(json.dumps({"step": 20.0,
                                                                    "loss/exit_30": 1.5}))
    results = finished(tmp_path)
    assert score(results["first"]["distill"]) > score(results["first"]["soft"])
    text = write_study_report(tmp_path, results).read_text()
    assert "| 24 |" in text and "**projected**" in text and "first round sft: train" in text
    assert "acceptance at draft 27 0.60 vs >= 0.60: met" in text
    assert "| full greedy, first / last timing | 10.0 / 13.0 ms (1.30x) |" in text
    assert "last-layer loss 1.000 vs <= 0.90: missed by 0.100" in text
    assert "distill step 20" in text and "| 30 | 1.500 |" in text
    # the 4x round: once chosen, SFT is its reference and each run is compared with its x1 run
    (tmp_path / "long_choice.json").write_text(json.dumps({"runs": ["soft", "distill"]}))
    longer = {str(e): {**v, "loss": v["loss"] - 0.5} for e, v in per_exit.items()}
    for name, acc in (("sft", 0.1), ("soft", 0.5)):
        (tmp_path / "x4" / "eval" / name).mkdir(parents=True)
        (tmp_path / "x4" / "eval" / name / "loss.json").write_text(json.dumps({"per_exit": longer}))
        (tmp_path / "x4" / "eval" / name / "decoding.json").write_text(json.dumps(_decoding(acc)))
    text = write_study_report(tmp_path, finished(tmp_path)).read_text()
    assert "## What 4x the training closes" in text
    assert "| soft | 1.000 -> 0.500 | - -> 0.000 | 1.900 -> 1.400 | 0.30 -> 0.50 | 0.30 -> 0.50 |" in text
    assert "long round distill: train, loss, sortedness, decoding" in text
    assert "long round soft: train, sortedness" in text and "long round depth" not in text
    assert "| sft |" not in text[text.index("## What 4x"):]
    # a = 0: one token per cycle for a draft plus a verify pass, 1.01 full-model reads
    assert abs(projected_speedup(0.0, 0.5)[0] - 1 / 1.01) < 1e-12
    assert projected_speedup(0.9, 0.25)[0] > projected_speedup(0.5, 0.25)[0] > 1


def test_reproduction_report_reads_the_decoding_task(tmp_path):
    from soft_jax.reproduce.report import decode_section

    lines = decode_section({"decode": {"soft": _decoding(0.4)}}, tmp_path)
    text = "\n".join(lines)
    assert "| 24 | 0.40 / 0.80x |" in text and "| paper |" in text
    assert (tmp_path / "speculative_speedup.png").is_file()
