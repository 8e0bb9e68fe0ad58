"""soft_jax: Sorted Fine-Tuning (SoFT) of LLaMA-family models in JAX/Flax."""

from soft_jax.config import LlamaConfig, preset
from soft_jax.convert import load_hf, save_hf
from soft_jax.loss import exit_loss
from soft_jax.model import exit_hidden_states, exit_logits, init_params
from soft_jax.generate import generate  # the function shadows the module; -m still runs the CLI
from soft_jax import eval  # noqa: E402,A004  soft_jax.eval.* after a plain `import soft_jax`

__all__ = ["LlamaConfig", "preset", "load_hf", "save_hf", "exit_loss", "exit_logits",
           "exit_hidden_states", "init_params", "generate", "eval"]
