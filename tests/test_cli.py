"""soft_jax.cli.flags: the shared `--config.a.b=value` overrides on the training schema (floats,
bools, nested tuples, bare comma lists) and their one-line errors."""

import pytest

from soft_jax.cli.flags import apply_overrides
from soft_jax.train.run_config import default_config


def test_overrides_on_the_train_schema():
    cfg = apply_overrides(default_config(), [
        "--config.optimizer.lr=1e-4", "--config.async_checkpointing=false",
        "--config.mesh.rules=(('activation_embed', 'tensor'),)", "--config.exits", "2,4",
        "--config.exit_weights=0.5,1.5", "--config.data.tokenizer=gguf:/m/x.gguf"])
    assert cfg.optimizer.lr == 1e-4 and cfg.async_checkpointing is False
    assert cfg.mesh.rules == (("activation_embed", "tensor"),)
    assert cfg.exits == (2, 4) and cfg.exit_weights == (0.5, 1.5)
    assert cfg.data.tokenizer == "gguf:/m/x.gguf"


@pytest.mark.parametrize("args,msg", [
    (["--config.optimizer.lrr=1"], "unknown config field config.optimizer.lrr"),
    (["--config.total_steps.x=1"], "unknown config field config.total_steps.x"),
    (["--config.total_steps=1.5"], "--config.total_steps=1.5"),
    (["--config.seed"], "--config.seed"),
    (["--workdir=x"], "'workdir'"),
    (["extra"], "unrecognized argument 'extra'"),
])
def test_bad_overrides_name_the_field(args, msg):
    with pytest.raises(ValueError) as e:
        apply_overrides(default_config(), args)
    assert msg in str(e.value) and "\n" not in str(e.value)
