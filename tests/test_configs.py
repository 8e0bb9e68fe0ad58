"""Every shipped config file loads and validates; the README sections they cite exist."""

import re
from pathlib import Path

import pytest

from soft_jax.model.config import preset
from soft_jax.model.layer_counts import normalize_exits
from soft_jax.eval.config import validate as validate_eval
from soft_jax.train.run_config import validate
from soft_jax.utils.config_file import load_config_file
from soft_jax.train.modes import exit_heads_for

ROOT = Path(__file__).resolve().parents[1]
TRAIN = sorted((ROOT / "configs").glob("*.py"))
EVAL = sorted((ROOT / "configs" / "eval").glob("*.py"))


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: p.name)
def test_training_config_validates(path):
    cfg = load_config_file(path)
    validate(cfg)
    if not cfg.model.init_from:  # random init: the model the run builds must be valid too
        config = preset(cfg.model.preset, **{k: v for k, v in cfg.model.overrides.items() if v},
                        param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
                        remat_policy=cfg.model.remat_policy)
        exits = normalize_exits(tuple(cfg.exits) or config.exits, config.num_layers)
        config.replace(exits=exits, exit_weights=tuple(cfg.exit_weights) or None,
                       num_exit_heads=exit_heads_for(cfg.mode, exits))


@pytest.mark.parametrize("path", EVAL, ids=lambda p: p.name)
def test_eval_config_validates(path):
    validate_eval(load_config_file(path))


def test_readme_sections_cited_by_configs_exist():
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$",
                                                        (ROOT / "README.md").read_text(), re.M)}
    cited = {(p.name, s) for p in TRAIN + EVAL
             for s in re.findall(r'README(?:\.md)?[:,]? "([^"]+)"', p.read_text())}
    missing = [(name, s) for name, s in cited if s not in headings]
    assert not missing, f"configs cite README sections that do not exist: {missing}"
    assert len(TRAIN) >= 10 and EVAL
