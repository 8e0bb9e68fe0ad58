"""The paper's evaluation protocol for a LLaMA-2 13B SoFT run (40 layers, exits 12..40) against
its SFT baseline: PandaLM pairwise on PandaLM's 170 validation instructions with the
PandaLM-7B judge, sorted-ness on the same prompts, TriviaQA EM and GSM8K per exit.

Paths are placeholders: set ckpt / second.ckpt / the judge folder / the instruction file
(an alpaca-format json of PandaLM's validation set) before running, e.g.

    soft-jax eval --config configs/eval/paper_13b.py --ckpt runs/soft13b \\
        --second-ckpt runs/sft13b --judge hf:/models/PandaLM-7B-v1 \\
        --config.generate.source=/data/pandalm_testset_alpaca.json
"""

from soft_jax.eval.config import default_config


def get_config():
    c = default_config()
    c.name = "SoFT"
    c.ckpt = "runs/llama2_13b_alpaca_soft"
    c.out_dir = "runs/eval_13b"
    c.exits = (12, 16, 20, 24, 28, 32, 36, 40)
    c.tasks = ("loss", "generate", "pairwise", "sortedness", "triviaqa", "gsm8k")
    c.batch_size = 8
    c.dtype = "bfloat16"

    c.loss.source = "gsm8k_demo:heldout"
    c.loss.format = "gsm8k"
    c.loss.seq_len = 2048

    c.generate.source = "pandalm_testset_alpaca.json"  # 170 instructions (alpaca format)
    c.generate.format = "alpaca"
    c.generate.max_new_tokens = 256  # the paper's PandaLM limit

    c.second.name = "SFT"
    c.second.ckpt = "runs/llama2_13b_alpaca_sft"
    c.pairwise.judge = "hf:WeOpenML/PandaLM-7B-v1"  # a local folder of the judge
    c.pairwise.judge_decoding = "beam"  # PandaLM's own decoding (4 beams, penalty 1.2)
    c.pairwise.judge_max_new_tokens = 512

    c.sortedness.source = "pandalm_testset_alpaca.json"
    c.sortedness.format = "alpaca"
    c.sortedness.max_examples = 170
    c.sortedness.positions = 20
    c.sortedness.response = "generated"  # the SoFT last layer's greedy response, shared

    c.triviaqa.source = "mandarjoshi/trivia_qa"
    c.triviaqa.subset = "rc.nocontext"
    c.triviaqa.split = "validation"
    c.triviaqa.max_new_tokens = 50  # the paper's limit

    c.gsm8k.source = "gsm8k_demo:heldout"
    c.gsm8k.shots = (0, 8)
    c.gsm8k.max_new_tokens = 256
    return c
