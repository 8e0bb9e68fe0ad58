"""The random-init demo (`soft-jax demo --random-init`): SoFT vs SFT of a small random-init
LLaMA on the packaged GSM8K demo split (1119 train / 200 held-out problems), sized for a
2-core CPU."""

from soft_jax.train.run_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/demo_random"
    c.mode = "soft"
    c.model.overrides = {"vocab_size": 0, "hidden_size": 128, "intermediate_size": 344,
                         "num_layers": 6, "num_heads": 4, "num_kv_heads": 2}
    c.exits = (2, 3, 4, 5, 6)
    c.data.tokenizer = "bpe:1024"
    c.data.seq_len = 256
    c.batch_size = 16
    c.total_steps = 150
    c.checkpoint_every = 75
    c.log_every = 25
    c.eval_batches = 16  # the whole held-out split
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 10
    return c
