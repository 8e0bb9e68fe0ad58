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
