"""Quick CPU eval of the tiny SoFT run (`soft-jax train --config configs/tiny.py`,
work dir runs/tiny) on the packaged GSM8K held-out demo split: every task but TriviaQA (no
offline TriviaQA data ships), a few examples each, offline ROUGE-L pairwise judge.

    soft-jax eval --config configs/eval/tiny_demo.py
    # against an SFT run as well (pairwise SoFT x SFT matrix, cross-model sorted-ness):
    soft-jax eval --config configs/eval/tiny_demo.py --second-ckpt runs/tiny_sft
"""

from soft_jax.eval.config import default_config


def get_config():
    c = default_config()
    c.name = "SoFT"
    c.ckpt = "runs/tiny"
    c.out_dir = "runs/tiny/eval"
    c.exits = ()  # all of the run's exits: 2, 3, 4
    c.tasks = ("loss", "gsm8k", "generate", "pairwise", "sortedness")
    c.batch_size = 8

    c.loss.source = "gsm8k_demo:heldout"
    c.loss.format = "gsm8k"
    c.loss.seq_len = 256
    c.loss.max_examples = 64

    c.gsm8k.source = "gsm8k_demo:heldout"
    c.gsm8k.max_examples = 8
    c.gsm8k.shots = (0, 2)
    c.gsm8k.max_new_tokens = 48

    c.generate.source = "gsm8k_demo:heldout"
    c.generate.format = "gsm8k"
    c.generate.max_examples = 8
    c.generate.max_new_tokens = 32

    c.second.name = "SFT"  # set second.ckpt for a SoFT x SFT comparison; empty = A vs A
    c.pairwise.judge = "rouge-l"

    c.sortedness.source = "gsm8k_demo:heldout"
    c.sortedness.format = "gsm8k"
    c.sortedness.max_examples = 16
    c.sortedness.positions = 20
    return c
