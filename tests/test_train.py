"""Training: each mode learns, ICT trains only heads, exact resume, signals, crash mid-save."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from soft_jax.io.checkpoint import TrainCheckpoints, load_params
from soft_jax.train.loop import train
from soft_jax.train.run_config import default_config, validate

ROOT = Path(__file__).resolve().parents[1]


def small_config(workdir, **kw):
    c = default_config()
    c.workdir = str(workdir)
    c.model.overrides = {"vocab_size": 0, "hidden_size": 32, "intermediate_size": 64,
                         "num_heads": 2, "num_kv_heads": 1}
    c.exits = (1, 2, 3)
    c.data.max_rows = 48
    c.data.seq_len = 192
    c.data.tokenizer = "bpe:400"
    c.batch_size = 4
    c.total_steps = 12
    c.checkpoint_every = 4
    c.log_every = 4
    c.eval_batches = 1
    c.optimizer.lr = 1e-2
    c.optimizer.warmup_steps = 2
    c.update_from_flattened_dict(kw)
    return c


def losses(result, key="loss"):
    return [h[key] for h in result["history"]]


@pytest.mark.parametrize("mode", ["soft", "sortednet"])  # sft: the grad-accumulation test
def test_loss_falls(tmp_path, mode):
    r = train(small_config(tmp_path / mode, mode=mode))
    assert r["status"] == "done" and r["step"] == 12
    assert losses(r)[-1] < losses(r)[0] - 0.3
    assert (tmp_path / mode / "metrics.jsonl").is_file() and (tmp_path / mode / "tb").is_dir()


def test_grad_accumulation_and_sft_leaves_exits_untrained(tmp_path):
    r = train(small_config(tmp_path / "acc", mode="sft", grad_accum=2))
    assert losses(r, "loss/exit_4")[-1] < losses(r, "loss/exit_4")[0] - 0.3


def test_ict_trains_only_the_exit_heads(tmp_path):
    sft = train(small_config(tmp_path / "sft", mode="sft", total_steps=4))
    r = train(small_config(tmp_path / "ict", mode="ict", total_steps=8,
                           **{"model.init_from": str(tmp_path / "sft")}))
    before, after = sft["params"], r["params"]
    for k in before:  # every block, embedding, norm and the shared head: bit-identical
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     before[k], after[k])
    assert after["exit_heads"]["kernel"].shape[0] == 3
    assert losses(r, "loss/exit_1")[-1] < losses(r, "loss/exit_1")[0]
    config, params = load_params(tmp_path / "ict")  # the heads are saved with the model
    assert config.num_exit_heads == 3 and "exit_heads" in params


def test_interrupt_and_resume_is_bit_exact(tmp_path):
    full = train(small_config(tmp_path / "full"))

    def interrupt_at_5(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    part = train(small_config(tmp_path / "split"), on_step=interrupt_at_5)
    assert part["status"] == "interrupted" and part["step"] == 5
    assert TrainCheckpoints(tmp_path / "split" / "checkpoints").latest_step() == 5
    rest = train(small_config(tmp_path / "split"))
    assert rest["step"] == 12
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 full["params"], rest["params"])
    assert losses(full)[-1] == losses(rest)[-1]


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    train(small_config(tmp_path / "run", total_steps=4))
    ckdir = tmp_path / "run" / "checkpoints"
    # what a kill during an Orbax save of step 8 leaves behind: an uncommitted temporary folder
    partial = ckdir / "8.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckdir / "4", partial)
    shutil.rmtree(partial / "params")
    (partial / "commit_success.txt").unlink(missing_ok=True)
    assert TrainCheckpoints(ckdir).latest_step() == 4
    config, params = load_params(tmp_path / "run")
    assert config.num_layers == 4
    r = train(small_config(tmp_path / "run", total_steps=8))
    assert r["step"] == 8 and TrainCheckpoints(ckdir).latest_step() == 8


def test_bad_config_and_missing_files(tmp_path):
    c = small_config(tmp_path / "x")
    c.unlocked_bogus = 1
    with pytest.raises(ValueError, match="unknown config field.*unlocked_bogus"):
        validate(c)
    with pytest.raises(ValueError, match="config.mode"):
        validate(small_config(tmp_path, mode="distill"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(small_config(tmp_path / "y", **{"data.source": str(tmp_path / "none.jsonl")}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"q": 1}))
    with pytest.raises(ValueError, match="row 1: field 'question' missing"):
        train(small_config(tmp_path / "z", **{"data.source": str(bad)}))


def test_cli_sigterm_then_resume_and_convert(tmp_path):
    wd = tmp_path / "cli"
    cmd = [sys.executable, "-m", "soft_jax", "train", "--config", str(ROOT / "configs/tiny.py"),
           f"--config.workdir={wd}", "--config.total_steps=400", "--config.log_every=1",
           "--config.checkpoint_every=1000", "--config.data.max_rows=32",
           "--config.data.seq_len=192", "--config.data.tokenizer=bpe:300",
           "--config.data.eval_source="]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (wd / "metrics.jsonl").is_file():
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "checkpointed step" in out
    step = TrainCheckpoints(wd / "checkpoints").latest_step()
    assert step is not None and 1 <= step < 400
    bad = subprocess.run(cmd[:4] + ["--config.no_such_field=3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert bad.returncode != 0 and "no_such_field" in bad.stderr
    from soft_jax.cli.convert import main as convert_main

    assert convert_main(["to-hf", "--ckpt", str(wd), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_first_step_has_a_nonzero_learning_rate(tmp_path):
    from soft_jax.train.loop import make_optimizer

    c = small_config(tmp_path, total_steps=10)
    c.optimizer.warmup_steps = 4
    _, schedule = make_optimizer(c)
    lrs = [float(schedule(s)) for s in range(10)]
    assert lrs[0] == pytest.approx(c.optimizer.lr / 4)
    assert lrs[3] == pytest.approx(c.optimizer.lr)  # peak after warm-up
    assert lrs[-1] == pytest.approx(c.optimizer.lr * c.optimizer.min_lr_ratio)
    assert all(a <= b for a, b in zip(lrs[:4], lrs[1:4]))
