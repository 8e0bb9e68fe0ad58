"""Tiny random-init SoFT run on the packaged GSM8K demo split: trains on CPU in seconds."""

from soft_jax.train.run_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/tiny"
    c.mode = "soft"
    c.exits = (2, 3, 4)
    c.total_steps = 30
    c.checkpoint_every = 10
    c.data.max_rows = 200
    c.data.seq_len = 256
    c.data.tokenizer = "bpe:1024"
    c.eval_batches = 2
    return c
