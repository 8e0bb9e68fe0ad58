"""The paper's recipe: LLaMA-2 13B, alpaca, mode soft (see soft_jax.train.run_config.paper_recipe)."""

from soft_jax.train.run_config import paper_recipe


def get_config():
    return paper_recipe("alpaca", "soft")
