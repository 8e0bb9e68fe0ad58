"""The journey's failure modes: NaN runs stop without saving, corrupt checkpoints fall back,
resumes are checked against the saved config, exit weights follow the exits as written, and
bad inputs are one-line errors."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import soft_jax as sj
from soft_jax.data import formats as data_lib
from soft_jax.io.checkpoint import (CheckpointError, NonFiniteParamsError, TrainCheckpoints,
                                 load_params, save_params)
from soft_jax.train.loop import TrainingDiverged, check_targets, train
from soft_jax.train.run_config import validate
from test_train import small_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """A finished 8-step run with checkpoints at steps 4 and 8."""
    wd = tmp_path_factory.mktemp("rel") / "run"
    r = train(small_config(wd, total_steps=8, eval_batches=0, **{"data.eval_source": ""}))
    return wd, jax.tree.map(np.asarray, r["params"])


def same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def params_file(step_dir: Path, item: str = "params") -> Path:
    files = [f for f in (step_dir / item).rglob("*") if f.is_file() and "/d/" in str(f)]
    return max(files, key=lambda f: f.stat().st_size)


def flip_one_bit(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))


def copy_run(run8, tmp_path) -> Path:
    wd = tmp_path / "run"
    shutil.copytree(run8[0], wd)
    return wd


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ item 2: corrupt / NaN
@pytest.mark.parametrize("fault", ["flip", "truncate", "no_metadata"])
def test_corrupt_latest_step_falls_back_with_a_warning(run8, tmp_path, fault):
    src, final = run8
    wd = tmp_path / "run"
    shutil.copytree(src, wd)
    _, step4 = load_params(wd / "checkpoints" / "4")
    f = params_file(wd / "checkpoints" / "8")
    if fault == "flip":
        raw = bytearray(f.read_bytes())
        for i in range(len(raw) // 2, len(raw) // 2 + 8):
            raw[i] ^= 0x5A
        f.write_bytes(bytes(raw))
    elif fault == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (wd / "checkpoints" / "8" / "params" / "_METADATA").unlink()
    with pytest.warns(RuntimeWarning, match="unusable"):
        _, params = load_params(wd)
    same(params, step4)
    # resume: step 8 is moved aside and redone from step 4 (a missing _METADATA does not stop
    # a restore into an explicit target, and step 8 then verifies against its checksum)
    bad_data = fault != "no_metadata"
    with (pytest.warns(RuntimeWarning, match="step 8 .* unusable") if bad_data
          else contextlib.nullcontext()):
        r = train(small_config(wd, total_steps=8, eval_batches=0, **{"data.eval_source": ""}))
    same(r["params"], final)
    assert bool(list((wd / "checkpoints").glob("corrupt-8-*"))) == bad_data


def test_step_without_integrity_record_is_unverified(run8, tmp_path, capsys):
    from soft_jax.cli.convert import main as convert_main
    from soft_jax.cli.eval import main as eval_main

    wd = copy_run(run8, tmp_path)
    _, step4 = load_params(wd / "checkpoints" / "4")
    (wd / "checkpoints" / "8" / "meta" / "metadata").unlink()  # the record goes ...
    f = params_file(wd / "checkpoints" / "8")
    intact = f.read_bytes()
    flip_one_bit(f)  # ... and a bit flips unseen
    with pytest.warns(RuntimeWarning, match="/8' is unusable .*no integrity record"):
        _, params = load_params(wd)
    same(params, step4)  # the previous, verified step
    with pytest.raises(CheckpointError, match="no integrity record.*--allow-unverified"):
        load_params(wd / "checkpoints" / "8")
    step8 = str(wd / "checkpoints" / "8")
    assert convert_main(["to-hf", "--ckpt", step8, "--out", str(tmp_path / "hf")]) == 2
    assert "no integrity record" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "hf").exists()
    eval_args = ["--ckpt", step8, "--tasks", "loss", "--config.loss.max_examples=2",
                 "--out", str(tmp_path / "ev")]
    assert eval_main(eval_args) == 2
    assert "no integrity record" in one_error_line(capsys.readouterr().err)
    f.write_bytes(intact)  # (a flip may also make a NaN, which stays refused)
    with pytest.warns(RuntimeWarning, match="loaded unverified"):  # asked for explicitly
        assert convert_main(["to-hf", "--ckpt", step8, "--out", str(tmp_path / "hf"),
                             "--allow-unverified"]) == 0


@pytest.mark.parametrize("fault", ["flip", "no_record"])
def test_optimizer_state_is_verified_on_resume(run8, tmp_path, fault):
    wd = copy_run(run8, tmp_path)
    if fault == "flip":
        flip_one_bit(params_file(wd / "checkpoints" / "8", "opt_state"))
    else:
        meta = wd / "checkpoints" / "8" / "meta" / "metadata"
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                                    if k != "opt_state_integrity"}))
    # a flipped bit either breaks the checksum or, in an exponent, makes a NaN / inf
    want = "opt_state (checksum mismatch|hold NaN)" if fault == "flip" else \
        "opt_state: no integrity"
    with pytest.warns(RuntimeWarning, match=f"step 8 .* unusable .*{want}"):
        r = train(small_config(wd, total_steps=8, eval_batches=0, **{"data.eval_source": ""}))
    same(r["params"], run8[1])  # step 8 redone from step 4, bit for bit
    label = "corrupt" if fault == "flip" else "unverified"
    assert len(list((wd / "checkpoints").glob(f"{label}-8-*"))) == 1


def test_step_older_than_opt_state_checksums_still_resumes(run8, tmp_path):
    wd = copy_run(run8, tmp_path)  # what a step written before the optimizer's record holds
    meta = wd / "checkpoints" / "8" / "meta" / "metadata"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                                if k not in ("opt_state_integrity", "recorded")}))
    with pytest.warns(RuntimeWarning, match="step 8 predates opt_state checksums"):
        r = train(small_config(wd, total_steps=9, eval_batches=0, **{"data.eval_source": ""}))
    assert r["step"] == 9 and not list((wd / "checkpoints").glob("*-8-*"))


def test_no_verified_step_moves_nothing_aside(run8, tmp_path):
    wd = copy_run(run8, tmp_path)
    for step in ("4", "8"):
        flip_one_bit(params_file(wd / "checkpoints" / step, "opt_state"))
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="no usable"):
        train(small_config(wd, total_steps=8, eval_batches=0, **{"data.eval_source": ""}))
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["4", "8"]


def test_huge_lr_stops_naming_the_step_and_keeps_finite_checkpoints(tmp_path):
    wd = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"non-finite .* at step \d+"):
        train(small_config(wd, total_steps=40, keep_checkpoints=1, checkpoint_every=1,
                           **{"optimizer.lr": 1e12, "optimizer.grad_clip": 0.0}))
    ck = TrainCheckpoints(wd / "checkpoints")
    saved = ck.latest_step()
    ck.close()
    if saved is not None:  # whatever was saved is finite and verified
        _, params = load_params(wd)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def dying_run(cfg, die_after: int):
    """`setup(cfg)` whose model dies once, after step `die_after`: all params and Adam
    moments become zero, the dead state the guard must catch (loss ln V, gradient norm 0)."""
    from soft_jax.train.loop import setup

    run, step_fn, died = setup(cfg), None, []

    def step(state, batch):
        state, metrics = step_fn(state, batch)
        if int(state.step) == die_after and not died:
            died.append(die_after)
            state = state.replace(params=jax.tree.map(jnp.zeros_like, state.params),
                                  opt_state=jax.tree.map(jnp.zeros_like, state.opt_state))
        return state, metrics

    step_fn, run.step_fn = run.step_fn, step
    return run


def meta_of(step_dir: Path) -> dict:
    return json.loads((step_dir / "meta" / "metadata").read_text())


def test_dead_model_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from soft_jax.train.loop import run_loop

    wd = tmp_path / "dead"
    cfg = small_config(wd, total_steps=30, checkpoint_every=2, keep_checkpoints=1,
                       eval_batches=0, **{"data.eval_source": ""})
    with pytest.raises(TrainingDiverged, match=r"gradient norm 0 .* for 5 steps in a row at step "
                                               r"11, since step 7.*step 4, is kept as the latest"):
        run_loop(dying_run(cfg, die_after=6))
    ck = wd / "checkpoints"  # keep 1: 6 and 8 rotated each other out, but never pinned 4
    assert [p.name.split("-")[1] for p in ck.glob("diverged-*")] == ["10"]
    assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["4"]
    _, params = load_params(wd)  # what generate / convert / a resume now read: step 4
    assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(params))


def test_divergence_retry_restores_and_skips_the_batches_since(tmp_path, capsys):
    from soft_jax.train.loop import run_loop

    wd = tmp_path / "retry"
    cfg = small_config(wd, total_steps=16, checkpoint_every=2, eval_batches=0,
                       **{"data.eval_source": "", "guard.retries": 1})
    r = run_loop(dying_run(cfg, die_after=6))
    assert r["status"] == "done" and r["step"] == 16
    assert "retry 1/1: back to checkpoint 4, skipping batches 4..10" in capsys.readouterr().out
    assert len(list((wd / "checkpoints").glob("diverged-*"))) >= 2
    meta = meta_of(wd / "checkpoints" / "16")
    assert (meta["batch_offset"], meta["guard_retries"]) == (7, 1)
    r = train(small_config(wd, total_steps=18, checkpoint_every=2, eval_batches=0,
                           **{"data.eval_source": "", "guard.retries": 1}))
    assert r["step"] == 18 and meta_of(wd / "checkpoints" / "18")["batch_offset"] == 7


def test_guard_is_quiet_on_a_fine_tune_and_catches_a_lasting_spike():
    from soft_jax.train.guard import DivergenceGuard, GuardSettings

    rng = np.random.default_rng(0)
    # a real fine-tune's SoFT loss: shallow exits start at 13-18 nats, the mean falls from ~8
    # to ~2 with per-batch noise, and single early spikes to 2.9x the median
    steps = np.arange(1, 301)
    losses = 2 + 6 * np.exp(-steps / 20) + rng.normal(0, 0.15, steps.size)
    losses[[14, 40, 41, 120]] *= 2.9
    g = DivergenceGuard(GuardSettings())
    assert all(g.observe(int(s), float(x), 1.0, 100.0) is None for s, x in zip(steps, losses))
    for s in range(301, 306):  # then the loss stays at ln(49152) = 10.8: diverged
        d = g.observe(s, 10.8, 1.0, 100.0)
    assert d is not None and (d.first, d.step) == (301, 305) and "above 3x" in d.reason
    g = DivergenceGuard(GuardSettings())
    assert g.observe(1, float("nan"), 1.0, 100.0).reason == "non-finite loss=nan at step 1"
    for s in range(2, 6):  # steps without target tokens say nothing
        assert g.observe(s, 0.0, 0.0, 0.0) is None
    assert g.healthy


def test_nonfinite_params_are_not_saved_and_not_converted(tmp_path):
    config = sj.preset("tiny")
    params = sj.init_params(config, jax.random.PRNGKey(0))
    bad = {**params, "final_norm": {"scale": params["final_norm"]["scale"].at[0].set(jnp.nan)}}
    ck = TrainCheckpoints(tmp_path / "ck", async_save=False)
    with pytest.raises(NonFiniteParamsError, match="step 3"):
        ck.save(3, bad, {}, {})
    assert ck.latest_step() is None
    ck.close()
    save_params(tmp_path / "nan", config, bad)
    from soft_jax.cli.convert import main

    assert main(["to-hf", "--ckpt", str(tmp_path / "nan"), "--out", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "a").exists()
    assert main(["to-hf", "--ckpt", str(tmp_path / "nan"), "--out", str(tmp_path / "b"),
                 "--allow-nonfinite"]) == 0
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_params(tmp_path / "nan")


# ------------------------------------------------------------------ one trainer per work dir
def tree_state(root: Path) -> dict:
    return {str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in root.rglob("*")}


TINY = ["--config", str(ROOT / "configs/tiny.py"), "--config.data.max_rows=8",
        "--config.data.tokenizer=bpe:300", "--config.data.eval_source="]


def test_second_trainer_exits_2_without_touching_the_work_dir(run8, tmp_path, capsys):
    from soft_jax.cli.train import main
    from soft_jax.train.workdir_lock import acquire

    wd = copy_run(run8, tmp_path)
    lock = acquire(wd)  # a live trainer: this process
    try:
        before = tree_state(wd)
        with pytest.raises(SystemExit) as e:
            main([*TINY, f"--config.workdir={wd}"])
        line = one_error_line(capsys.readouterr().err)
        assert e.value.code == 2 and "in use by another trainer" in line
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in line
        assert tree_state(wd) == before
        same(load_params(wd)[1], run8[1])  # readers never look at the lock
    finally:
        lock.release()


def test_stale_lock_of_a_dead_trainer_is_taken_over(run8, tmp_path, capsys):
    wd = copy_run(run8, tmp_path)
    gone = subprocess.Popen(["true"])  # a PID that has just ended on this host
    gone.wait()
    (wd / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                               "started": time.time() - 60}))
    r = train(small_config(wd, total_steps=9, eval_batches=0, **{"data.eval_source": ""}))
    assert r["step"] == 9
    assert (f"taking over the stale work-dir lock of PID {gone.pid} on host "
            f"{socket.gethostname()}") in capsys.readouterr().out
    assert (wd / "train.lock").read_text() == ""  # released at the end


@contextlib.contextmanager
def read_only(path: Path):
    """`path` and everything in it unwritable, even for root (which writes through modes:
    the tree is made immutable instead)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("running as root without chattr +i: cannot make a folder read-only")
        undo = ["chattr", "-R", "-i", str(path)]
    else:
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
        undo = ["chmod", "-R", "u+w", str(path)]
    try:
        yield path
    finally:
        subprocess.run(undo, check=True)


def test_work_dirs_that_cannot_be_used_are_one_line_errors(run8, tmp_path, capsys):
    from soft_jax.cli.train import main

    (tmp_path / "afile").write_text("")
    (tmp_path / "fresh").mkdir()
    resume = copy_run(run8, tmp_path)
    for wd, want, state in ((tmp_path / "afile" / "wd", "is a file, not a folder", None),
                            (tmp_path / "fresh", "cannot be written", read_only),
                            (resume, "cannot be written", read_only)):
        with state(wd) if state else contextlib.nullcontext(), pytest.raises(SystemExit) as e:
            main([*TINY, f"--config.workdir={wd}"])
        assert e.value.code == 2 and want in one_error_line(capsys.readouterr().err), wd
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == []


def test_convert_outputs_it_cannot_write_and_ctrl_c_are_one_line(run8, tmp_path, capsys,
                                                                monkeypatch):
    from soft_jax.cli import convert
    from soft_jax.io import hf

    step4 = str(run8[0] / "checkpoints" / "4")
    (tmp_path / "ro").mkdir()
    (tmp_path / "empty").write_text("")
    with read_only(tmp_path / "ro"):
        assert convert.main(["to-hf", "--ckpt", step4, "--out", str(tmp_path / "ro" / "hf")]) == 2
    assert "is not writable" in one_error_line(capsys.readouterr().err)
    assert convert.main(["to-hf", "--ckpt", step4, "--out", str(tmp_path / "empty")]) == 2
    assert "is an existing file, not a folder" in one_error_line(capsys.readouterr().err)

    def ctrl_c(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "_write_safetensors", ctrl_c)  # SIGINT mid-write
    assert convert.main(["to-hf", "--ckpt", step4, "--out", str(tmp_path / "hf")]) == 130
    assert "interrupted" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ro"]  # nothing partial


def test_unreadable_step_message_names_the_problem_not_an_object(run8, tmp_path):
    from soft_jax.utils.log import one_line

    wd = copy_run(run8, tmp_path)
    f = params_file(wd / "checkpoints" / "8")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_params(wd / "checkpoints" / "8")
    assert "bound method" not in str(e.value) and "TensorStore({" not in str(e.value)
    try:
        try:
            raise ValueError("OUT_OF_RANGE: byte range " + "[1, 2) " * 60)
        except ValueError as cause:
            raise Exception("reading array index: (0, 4). See full TensorStore details: "
                            "<bound method spec of TensorStore({\n 'base': 1})>.") from cause
    except Exception as err:  # noqa: BLE001
        line = one_line(err)
    assert line.startswith("Exception: reading array index: (0, 4). (from ValueError: OUT_OF")
    assert line.endswith("[1, 2) ...)") and len(line) < 260


# ------------------------------------------------------------------ item 3: resume
def test_resume_rejects_changes_allows_growth_and_says_when_done(run8, tmp_path, capsys):
    src, _ = run8
    wd = tmp_path / "run"
    shutil.copytree(src, wd)
    base = dict(total_steps=8, eval_batches=0, **{"data.eval_source": ""})
    with pytest.raises(ValueError, match=r"seq_len: saved 192, now 128; mode: saved 'soft', "
                                         r"now 'sft'"):
        train(small_config(wd, mode="sft", **{**base, "data.seq_len": 128}))
    with pytest.raises(ValueError, match=r"exits: saved \[1, 2, 3\], now \[1, 3\]"):
        train(small_config(wd, exits=(1, 3), **base))
    r = train(small_config(wd, **base))
    assert "already at step 8 >= total_steps=8" in capsys.readouterr().out and r["step"] == 8
    r = train(small_config(wd, **{**base, "total_steps": 9}))
    assert r["step"] == 9 and "total_steps 8 -> 9" in capsys.readouterr().out


def test_readme_sequence_uses_its_own_work_dirs():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines()
             if "soft-jax train --config configs/tiny.py" in ln and "--config.mode=" in ln]
    assert lines and all("--config.workdir=" in ln for ln in lines)


# ------------------------------------------------------------------ item 4: exit weights
def test_exit_weights_pair_with_exits_as_written():
    config = sj.preset("tiny", exits=(4, 2), exit_weights=(1.0, 0.0))
    assert config.exits == (2, 4) and config.exit_weights == (0.0, 1.0)
    params = sj.init_params(config, jax.random.PRNGKey(0))
    ids = np.arange(16, dtype=np.int32).reshape(2, 8)
    loss, m = sj.exit_loss(config, params, {"input_ids": ids, "targets": ids})
    np.testing.assert_allclose(loss, m["loss/exit_4"], rtol=1e-6)
    with pytest.raises(ValueError, match="exit_weights has 1 entries but exits=\\(4, 2\\)"):
        sj.preset("tiny", exits=(4, 2), exit_weights=(1.0,))
    c = small_config("/tmp/unused", exits=(3, 1), exit_weights=(1.0, 0.0, 0.0))
    from soft_jax.train.loop import build_model

    config, _ = build_model(c, 400)
    assert config.exits == (1, 3, 4) and config.exit_weights == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="config.exit_weights has 2 entries"):
        build_model(small_config("/tmp/unused", exits=(3, 1, 2), exit_weights=(1.0, 0.0)), 400)


def test_build_model_with_fewer_layers_than_the_presets_exits():
    from soft_jax.train.loop import build_model, preset_config

    c = small_config("/tmp/unused", exits=(1,))
    c.model.overrides.num_layers = 2  # tiny's own exits are (2, 3, 4)
    config, params = build_model(c, 400)
    assert config.num_layers == 2 and config.exits == (1, 2)
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape[0] == 2
    for layers, want in ((2, (2,)), (3, (2, 3)), (6, (2, 3, 4))):  # no run exits: clipped
        c.model.overrides.num_layers = layers
        assert preset_config(c, 400).exits == want
    c.exits = (1, 3)
    c.model.overrides.num_layers = 2
    with pytest.raises(ValueError, match=r"exit 3 .*config.exits=\(1, 3\) on a model of 2 "):
        build_model(c, 400)


# ------------------------------------------------------------------ item 5: inputs
@pytest.mark.parametrize("field,value,match", [
    ("checkpoint_every", 0, "config.checkpoint_every must be >= 1"),
    ("data.format", "csv", "config.data.format='csv'"),
])
def test_bad_config_values_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        validate(small_config("/tmp/unused", **{field: value}))


def test_bad_values_are_refused_naming_them(run8, tmp_path, capsys):
    from soft_jax.cli.generate import main as generate_main

    config = sj.preset("tiny")
    params = sj.init_params(config, jax.random.PRNGKey(0))
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite temperature >= 0"):
            sj.generate(config, params, [1, 2], 2, temperature=t)
    with pytest.raises(ValueError, match="thresholds: exit 2 has nan; a threshold is a top-1 "
                                         "probability"):  # above 1 means: never exit there
        sj.generate(config, params, [1, 2], 2, thresholds={2: float("nan")})
    step4 = str(run8[0] / "checkpoints" / "4")
    for flags, want in ((["--temperature", "nan"], "finite temperature"),
                        (["--dynamic", "--thresholds", "2:1.5"], "probability in [0, 1]")):
        assert generate_main(["--ckpt", step4, "--prompt-ids", "1,2", *flags]) == 2
        assert want in one_error_line(capsys.readouterr().err)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data_lib.DataError, match=r"latin1.jsonl:2: invalid UTF-8 \(byte 0xe9"):
        data_lib.load_rows(str(bad))


def test_hf_folders_that_would_convert_wrong_are_refused(hf_model_factory, tmp_path, capsys):
    from soft_jax.cli.convert import main
    from test_loading import word_tokenizer

    folder, _ = hf_model_factory(vocab=101, layers=2)
    mistral, _ = hf_model_factory(name="mistral", layers=2)
    word_tokenizer(folder, 300)  # more tokens than the model embeds
    capsys.readouterr()  # what saving the models printed
    assert main(["from-hf", "--hf", str(folder), "--out", str(tmp_path / "a")]) == 2
    assert "has 300 tokens but config.json vocab_size is 101" in one_error_line(
        capsys.readouterr().err)
    cfg = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**cfg, "sliding_window": 64}))
    assert main(["from-hf", "--hf", str(mistral), "--out", str(tmp_path / "b")]) == 2
    assert "sliding_window=64 is set" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_harness_limit_zero_and_a_work_dir_without_checkpoints(tmp_path, capsys):
    from soft_jax.cli.harness import main as harness_main
    from soft_jax.cli.generate import main as generate_main

    out = tmp_path / "harness"
    assert harness_main(["--ckpt", str(tmp_path), "--tasks", "soft_gsm8k", "--limit", "0",
                         "--output", str(out)]) == 2
    assert "--limit 0: expected" in one_error_line(capsys.readouterr().err)
    assert not out.exists()
    wd = tmp_path / "young"  # a run that has not reached its first checkpoint
    (wd / "checkpoints").mkdir(parents=True)
    (wd / "model_config.json").write_text(json.dumps(sj.preset("tiny").to_dict()))
    assert generate_main(["--ckpt", str(wd), "--prompt-ids", "1,2"]) == 2
    assert "is a work dir with no checkpoint yet" in one_error_line(capsys.readouterr().err)


def test_data_files_fail_early_with_file_and_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(data_lib.DataError, match="empty.jsonl.* is empty"):
        data_lib.load_rows(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(data_lib.DataError, match=r"bad.jsonl:2: invalid JSON"):
        data_lib.load_rows(str(bad))
    t0 = time.perf_counter()
    os.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for missing in ("mydata", "data/train"):
        with pytest.raises(FileNotFoundError, match=f"{missing!r} does not exist"):
            data_lib.load_rows(missing)
    assert time.perf_counter() - t0 < 2  # no hub lookup


def test_no_target_tokens_is_an_error_and_truncation_warns(capsys):
    stats = data_lib.DataStats(rows=10, truncated=10, no_targets=10, target_tokens=0)
    with pytest.raises(data_lib.DataError, match="no target tokens.*seq_len=64"):
        check_targets(stats, 64)
    check_targets(data_lib.DataStats(rows=10, truncated=3, no_targets=1, target_tokens=50), 64)
    assert "3 of 10 rows (30%) are truncated" in capsys.readouterr().out


def test_token_checks_on_concrete_inputs_only():
    config = sj.preset("tiny")
    params = sj.init_params(config, jax.random.PRNGKey(0))
    ids = np.ones((1, 4), np.int32)
    for bad, match in ((ids * 512, "outside the vocabulary 0..511"), (-ids, "outside"),
                       (ids.astype(np.float32), "integer token ids"), (ids[0], "2-D")):
        with pytest.raises(ValueError, match=match):
            sj.exit_logits(config, params, bad)
        with pytest.raises(ValueError, match=match):
            sj.exit_loss(config, params, {"input_ids": bad, "targets": ids})
    with pytest.raises(ValueError, match="targets holds 1 value"):
        sj.exit_loss(config, params, {"input_ids": ids, "targets": np.array([[-1, 1, 1, 1]])})
    sj.exit_loss(config, params, {"input_ids": ids, "targets": np.array([[-100, 1, 1, 1]])})
    from soft_jax.train.heldout import per_exit_metrics

    with pytest.raises(ValueError, match="targets holds"):
        per_exit_metrics(config, params, [{"input_ids": ids, "targets": ids * 600}])
    traced = jax.jit(lambda x: sj.exit_logits(config, params, x)[4])(ids)  # no host check
    assert traced.shape == (1, 4, 512)


def test_generate_position_limit_and_dynamic_without_exits():
    config = sj.preset("tiny", max_position_embeddings=8)
    params = sj.init_params(config, jax.random.PRNGKey(0))
    with pytest.warns(RuntimeWarning, match="exceeds max_position_embeddings=8"):
        sj.generate(config, params, [1, 2, 3, 4, 5], 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sj.generate(config, params, [1, 2, 3, 4, 5], 4, strict=True)
    none = config.replace(exits=None)
    with pytest.raises(ValueError, match="dynamic decoding needs exits"):
        sj.generate(none, params, [1, 2], 2, dynamic=True)


def test_train_cli_one_line_errors():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "soft_jax", "train", "--config", "configs/tiny.py",
                        "--config.optimzer.lr=1", "--config.data.source=nope.jsonl"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown config field config.optimzer.lr" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([sys.executable, "-m", "soft_jax", "train", "--config", "configs/tiny.py",
                        "--config.data.source=nope.jsonl", "--config.workdir=/tmp/_nope"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        "error: data file 'nope.jsonl' does not exist")
    assert "Traceback" not in p.stderr


def test_train_main_is_callable_from_python(tmp_path, capsys):
    from soft_jax.cli.train import main

    args = ["--config", str(ROOT / "configs/tiny.py"), f"--config.workdir={tmp_path / 'm'}",
            "--config.total_steps=2", "--config.log_every=1", "--config.batch_size=2",
            "--config.data.max_rows=8", "--config.data.seq_len=192",
            "--config.data.tokenizer=bpe:300", "--config.data.eval_source="]
    r = main(args)
    assert r["status"] == "done" and r["step"] == 2 and "step 2/2" in capsys.readouterr().out
    for bad in (["--config.optimzer.lr=1"], ["--config.total_steps=x"], ["stray"]):
        with pytest.raises(SystemExit) as e:  # a second parse in the same process
            main(args + bad)
        assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


# ------------------------------------------------------------------ item 6: packaging
def test_pyproject_declares_the_imported_dependencies_and_tarball_excludes_outputs():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].strip().lower() for d in deps}
    assert {"jax", "flax", "optax", "orbax-checkpoint", "transformers", "datasets",
            "ml-collections", "safetensors"} <= names
    assert not any("==" in d for d in deps)
    pinned = (ROOT / "requirements.txt").read_text()
    assert "jax==" in pinned and "flax==" in pinned
    tpu = (ROOT / "launch" / "tpu_pod.sh").read_text()
    for folder in ("runs", "work_dirs", "demo_out", "checkpoints", ".venv"):
        assert f"--exclude={folder} " in tpu or f"--exclude={folder}\n" in tpu.replace(" \\", "")
    readme = (ROOT / "README.md").read_text()
    assert not [ln for ln in readme.splitlines() if ln.startswith("python -m")]


def test_background_save_failures_print_short_lines_once(capsys, caplog):
    # What Orbax's save threads log or raise when a save fails (e.g. a full disk): without
    # --debug, short lines without tracebacks, each distinct one once.
    import threading

    from absl import logging

    from soft_jax.cli.train import brief_library_errors

    def fail():
        raise OSError("No space left on device\ndetails")

    with brief_library_errors():
        try:
            fail()
        except OSError:
            logging.error("save thread raised: %s", "RESOURCE_EXHAUSTED " + "x" * 400,
                          exc_info=True)
        for _ in range(3):
            t = threading.Thread(target=fail)
            t.start()
            t.join()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("No space left on device") == 1, err
    assert "(background) OSError: No space left on device" in err
    (record,) = [r for r in caplog.records if "save thread raised" in r.getMessage()]
    assert record.exc_info is None and len(record.getMessage()) <= 240
    assert threading.excepthook is not None and logging.get_absl_logger().filters == []
