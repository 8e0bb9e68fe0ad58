"""Evaluation of every exit of a SoFT model: loss / perplexity, GSM8K and TriviaQA accuracy,
per-exit generation, PandaLM-style pairwise comparison and the sorted-ness analysis.

    soft-jax eval --config configs/eval/tiny_demo.py [--ckpt DIR | --hf DIR] ...

Submodules: scoring (answer extraction, exact match, ROUGE-L), harness (lm-evaluation-harness
adapter and `run_exits`), pairwise (judges, counting), sortedness (KL / cosine per exit
and position), report (Markdown + PNG), runner (the tasks), config (the eval config schema).
"""

from soft_jax.eval.scoring import (extract_gsm8k_answer, lm_eval_gsm8k, normalize_triviaqa,
                                   rouge_l, triviaqa_exact_match)

__all__ = ["extract_gsm8k_answer", "lm_eval_gsm8k", "triviaqa_exact_match", "normalize_triviaqa",
           "rouge_l"]
