"""SoFT of a real SmolLM2-135M (LLaMA architecture) on the GSM8K demo split.

`model.init_from` is the hub name (fetched once); offline, point it at a Hugging Face folder
of the model instead (see README: "Training"):
    soft-jax train --config configs/smollm2_gsm8k_soft.py \
        --config.model.init_from=/path/to/smollm2-hf
"""

from soft_jax.train.run_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/smollm2-gsm8k-soft"
    c.model.init_from = "HuggingFaceTB/SmolLM2-135M-Instruct"
    c.exits = (6, 12, 18, 24, 30)
    c.data.tokenizer = ""  # the model's own
    c.data.seq_len = 384
    c.batch_size = 8
    c.total_steps = 300
    c.checkpoint_every = 100
    c.optimizer.lr = 5e-5
    c.optimizer.warmup_steps = 10
    c.optimizer.min_lr_ratio = 0.0
    return c
