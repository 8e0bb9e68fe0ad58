"""The 'small' shape (8 layers, hidden 512, vocab 32000 rows) on the GSM8K demo split, CPU-sized."""

from soft_jax.train.run_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/small-soft"
    c.model.preset = "small"
    c.model.overrides = {"vocab_size": 32000}
    c.exits = (2, 4, 6, 8)
    c.data.tokenizer = "bpe:4096"
    c.data.seq_len = 512
    c.batch_size = 8
    c.total_steps = 200
    c.checkpoint_every = 100
    c.optimizer.lr = 1e-3
    return c
