"""Checkpoints and HF folders written before soft_jax moved into its wings (commit 119a8a3,
tests/data/legacy_119a8a3: a 2-step tiny SoFT work dir and its `convert to-hf` folder) load
and decode as they did, and a saved config's positional rope_scaling still reads."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np

import soft_jax as sj
from soft_jax.model.config import LlamaConfig, RopeScaling

LEGACY = Path(__file__).parent / "data" / "legacy_119a8a3"
# what 119a8a3's `python -m soft_jax.generate --ckpt WORKDIR --prompt-ids 5,6,7
# --max-new-tokens 4` printed for this work dir (greedy is deterministic)
GREEDY = [37, 118, 131, 209]


def test_legacy_work_dir_and_hf_folder_load_and_decode(tmp_path):
    config, params, tok, _ = sj.load_model(LEGACY / "workdir")
    assert config.num_layers == 4 and config.exits == (2, 3, 4) and tok is not None
    assert sj.generate(config, params, [5, 6, 7], 4).tokens[0] == GREEDY
    _, hf_params = sj.load_hf(LEGACY / "hf")
    jax.tree.map(np.testing.assert_array_equal, params, hf_params)  # the same weights


def test_legacy_work_dir_resumes_with_the_new_command(tmp_path):
    from soft_jax.cli.train import main

    wd = tmp_path / "wd"
    shutil.copytree(LEGACY / "workdir", wd)
    saved = json.loads((wd / "train_config.json").read_text())
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import ml_collections\n\n\ndef get_config():\n"
                   f"    return ml_collections.ConfigDict({saved!r})\n")
    r = main(["--config", str(cfg), f"--config.workdir={wd}", "--config.total_steps=3"])
    assert r["status"] == "done" and r["step"] == 3


def test_positional_rope_scaling_of_saved_configs_reads_as_named_fields():
    old = {**LlamaConfig().to_dict(), "rope_scaling": ["llama3", 8.0, 1.0, 4.0, 8192]}
    config = LlamaConfig.from_dict(json.loads(json.dumps(old)))
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert config.rope_scaling.original_max_position_embeddings == 8192
    assert LlamaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
