"""The conversion CLI end to end: from-hf, to-hf (full and --exit), errors, tokenizer files."""

import json
from pathlib import Path

import numpy as np
import pytest

import soft_jax as sj
from soft_jax.cli.convert import main


def test_cli_round_trip_with_exit_and_tokenizer(hf_model_factory, tmp_path):
    folder, _ = hf_model_factory(layers=4)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    ckpt = tmp_path / "ckpt"
    assert main(["from-hf", "--hf", str(folder), "--out", str(ckpt), "--exits", "2,3"]) == 0
    assert (ckpt / "model_config.json").is_file() and (ckpt / "tokenizer").is_dir()
    assert main(["to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "full")]) == 0
    assert main(["to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "e2"), "--exit", "2",
                 "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "e2" / "tokenizer_config.json").is_file()
    cfg = json.loads((tmp_path / "e2" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["dtype"] == "bfloat16"
    config, params = sj.load_hf(folder)
    config2, params2 = sj.load_hf(tmp_path / "full")
    ids = np.arange(10)[None] % config.vocab_size
    np.testing.assert_array_equal(sj.exit_logits(config, params, ids)[4],
                                  sj.exit_logits(config2, params2, ids)[4])


def test_cli_errors_are_clear_and_write_nothing(hf_model_factory, tmp_path, capsys):
    folder, _ = hf_model_factory(layers=3)
    ckpt = tmp_path / "ckpt"
    assert main(["from-hf", "--hf", str(folder), "--out", str(ckpt)]) == 0
    assert main(["to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--exit", "7"]) == 2
    assert "exit 7 is not a layer count" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["from-hf", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "c2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["from-hf", "--hf", str(folder), "--out", str(ckpt)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "not a soft_jax checkpoint" in capsys.readouterr().err


def _tiny_gguf(path, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_from_gguf_errors_are_clear(tmp_path, capsys, monkeypatch):
    gpt2 = _tiny_gguf(tmp_path / "gpt2.gguf", "gpt2")
    assert main(["from-gguf", "--gguf", str(gpt2), "--out", str(tmp_path / "c")]) == 2
    assert "architecture 'gpt2'" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert main(["from-gguf", "--gguf", str(tmp_path / "nope.gguf"), "--hf-out",
                 str(tmp_path / "h")]) == 2
    assert "nope.gguf" in capsys.readouterr().err
    assert main(["from-gguf", "--gguf", str(gpt2)]) == 2
    assert "--out CKPT and/or --hf-out DIR" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["from-gguf", "--gguf", str(gpt2), "--hf-out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real(name, *a))
    assert main(["from-gguf", "--gguf", str(gpt2), "--out", str(tmp_path / "c")]) == 2
    assert "pip install accelerate" in capsys.readouterr().err


def test_from_gguf_creates_missing_parent_folders(tmp_path, monkeypatch):
    # README's `--out ckpt/smollm2` on a fresh checkout: ckpt/ does not exist yet.
    import soft_jax.cli.convert as convert

    def fake(src, out, *rest):
        Path(out).mkdir(parents=True)
        return Path(out)

    monkeypatch.setattr(convert, "hf_from_gguf", fake)
    monkeypatch.setattr(convert, "checkpoint_from_hf", fake)
    out = tmp_path / "new" / "ckpt"
    assert main(["from-gguf", "--gguf", str(tmp_path / "m.gguf"), "--out", str(out)]) == 0
    assert out.is_dir()


def test_every_cli_error_is_one_line_unless_debug_asks(tmp_path, capsys, monkeypatch):
    from soft_jax.cli.generate import main as generate_main

    for cli in (lambda: main(["to-hf", "--ckpt", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "o")]),
                lambda: generate_main(["--ckpt", str(tmp_path / "nope"), "--prompt-ids", "1"])):
        assert cli() == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        monkeypatch.setenv("SOFT_JAX_DEBUG", "1")
        with pytest.raises(FileNotFoundError, match="does not exist"):
            cli()
        monkeypatch.delenv("SOFT_JAX_DEBUG")
