"""HF <-> soft_jax parity: per-exit logits, round trips, sub-model export, the loss."""

import json

import jax
import numpy as np
import pytest
import torch

import soft_jax as sj
from soft_jax.io.families import ConversionError
from soft_jax.io.hf import read_safetensors

SHAPES = [
    dict(),  # GQA, untied
    dict(heads=4, kv_heads=4, tie=True, theta=500000.0, vocab=97),  # MHA, tied, odd vocab
    dict(heads=6, kv_heads=2, hidden=48, layers=7, vocab=131, head_dim=16),  # explicit head_dim
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
]


def torch_exit_logits(model, ids: np.ndarray) -> dict[int, np.ndarray]:
    """lm_head(norm(h_n)) for every layer n of a torch model (HF's last state is already normed)."""
    with torch.no_grad():
        out = model(torch.tensor(ids), output_hidden_states=True)
        hs = out.hidden_states
        n_layers = len(hs) - 1
        res = {n: model.lm_head(model.model.norm(hs[n])).float().numpy() for n in range(1, n_layers)}
        res[n_layers] = out.logits.float().numpy()
    return res


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / (np.abs(b).max() + 1e-12))


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa", "mha-tied", "headdim", "llama3-rope"])
def test_exit_logits_match_torch(hf_model_factory, shape):
    folder, model = hf_model_factory(**shape)
    layers = model.config.num_hidden_layers
    exits = (1, 2, layers - 1, layers) if layers > 4 else (1, layers)
    config, params = sj.load_hf(folder, exits=(2, layers - 1))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 24))
    ref = torch_exit_logits(model, ids)
    ours = sj.exit_logits(config, params, ids, exits=exits)
    assert sorted(ours) == sorted(exits)
    for n in exits:
        assert ours[n].dtype == np.float32 and ours[n].shape == (2, 24, config.vocab_size)
        assert rel_err(ours[n], ref[n]) < 1e-4, n
    default = sj.exit_logits(config, params, ids)  # the config's exits, last layer included
    assert sorted(default) == [2, layers - 1, layers]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_roundtrip_is_bit_exact(hf_model_factory, tmp_path, dtype):
    folder, _ = hf_model_factory(dtype=dtype, tie=dtype == "float16")
    config, params = sj.load_hf(folder, dtype=None)
    out = sj.save_hf(config, params, tmp_path / "back")
    a, b = read_safetensors(folder), read_safetensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    # float32 working copy written back in the file's dtype is exact too
    config32, params32 = sj.load_hf(folder)
    out2 = sj.save_hf(config32, params32, tmp_path / "back2", dtype=dtype)
    b2 = read_safetensors(out2)
    assert all(a[k].tobytes() == b2[k].tobytes() for k in a)


def test_saved_folder_loads_in_transformers_without_warnings(hf_model_factory, tmp_path):
    from transformers import LlamaForCausalLM

    folder, model = hf_model_factory(layers=6)
    config, params = sj.load_hf(folder)
    out = sj.save_hf(config, params, tmp_path / "exported", max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded path exercised
    reloaded, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        np.testing.assert_array_equal(model(torch.tensor(ids)).logits.numpy(),
                                      reloaded(torch.tensor(ids)).logits.numpy())
    # and the sharded folder loads back into soft_jax
    config2, params2 = sj.load_hf(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize("tie", [False, True])
def test_exit_submodel_export_reproduces_exit(hf_model_factory, tmp_path, tie):
    from transformers import LlamaForCausalLM

    folder, _ = hf_model_factory(layers=6, tie=tie)
    config, params = sj.load_hf(folder, exits=(2, 4))
    ids = np.random.default_rng(2).integers(0, config.vocab_size, (2, 10))
    ours = sj.exit_logits(config, params, ids, exits=(3,))[3]
    out = sj.save_hf(config, params, tmp_path / "exit3", exit_layer=3)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["num_hidden_layers"] == 3
    sub, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        theirs = sub(torch.tensor(ids)).logits.numpy()
    assert rel_err(ours, theirs) < 1e-4


def test_loss_matches_mean_of_torch_cross_entropies(hf_model_factory):
    folder, model = hf_model_factory(layers=5)
    config, params = sj.load_hf(folder, exits=(1, 3))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, config.vocab_size, (2, 16))
    targets = rng.integers(0, config.vocab_size, (2, 16))
    mask = (rng.random((2, 16)) > 0.3).astype(np.int32)
    mask[:, :4] = 0  # a masked prompt
    loss, metrics = sj.exit_loss(config, params,
                                 {"input_ids": ids, "targets": targets, "loss_mask": mask})
    ref = torch_exit_logits(model, ids)
    ces = []
    for n in (1, 3, 5):
        lt = torch.tensor(ref[n]).reshape(-1, config.vocab_size)
        tt = torch.tensor(np.where(mask > 0, targets, -100)).reshape(-1)
        ces.append(torch.nn.functional.cross_entropy(lt, tt, ignore_index=-100).item())
        np.testing.assert_allclose(float(metrics[f"loss/exit_{n}"]), ces[-1], rtol=1e-5)
    np.testing.assert_allclose(float(loss), np.mean(ces), rtol=1e-5)
    # HF-style labels (unshifted, -100 ignored) give torch's own loss at the last layer
    labels = np.where(rng.random((2, 16)) > 0.2, ids, -100)
    _, m2 = sj.exit_loss(config, params, {"input_ids": ids, "labels": labels}, exits=(5,))
    with torch.no_grad():
        hf_loss = model(torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
    np.testing.assert_allclose(float(m2["loss/exit_5"]), hf_loss, rtol=1e-5)


def test_bad_inputs_raise_clear_errors(hf_model_factory, tmp_path):
    folder, _ = hf_model_factory(layers=3)
    # mis-shaped tensor
    from safetensors.numpy import load_file, save_file

    t = load_file(folder / "model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    t2 = dict(t)
    t2["model.layers.1.mlp.up_proj.weight"] = t2["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(t2, bad / "model.safetensors")
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        sj.load_hf(bad)
    # missing tensor
    del t2["model.layers.1.mlp.up_proj.weight"]
    save_file(t2, bad / "model.safetensors")
    with pytest.raises(ConversionError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        sj.load_hf(bad)
    # unknown architecture
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]  # Mistral / Qwen are families now
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="architecture"):
        sj.load_hf(bad)
    # unsupported rope type
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="yarn"):
        sj.load_hf(bad)
    # non-empty output folder, bad exit: nothing written
    config, params = sj.load_hf(folder)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        sj.save_hf(config, params, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ConversionError, match="not a layer count"):
        sj.save_hf(config, params, tmp_path / "x", exit_layer=4)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_old_style_rope_config_is_read(hf_model_factory, tmp_path):
    folder, _ = hf_model_factory(layers=2, theta=500000.0)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    config, _ = sj.load_hf(folder)
    assert config.rope_theta == 500000.0 and config.rope_scaling[:2] == ("linear", 2.0)
