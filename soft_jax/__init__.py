"""soft_jax: Sorted Fine-Tuning (SoFT) of LLaMA-family models in JAX/Flax.

The public API is a handful of functions, loaded on first use so that `import soft_jax`
stays cheap (the `soft-jax` command imports only the wing its subcommand needs):

    import soft_jax as sj
    sj.load_hf, sj.save_hf, sj.load_model, sj.exit_logits, sj.exit_loss, sj.generate, ...

The wings, each a subpackage whose imports only point down this list:
utils, parallel, model, data, io, train, infer, eval, reproduce, and cli (the commands).
"""

import importlib

from soft_jax.utils.platforms import choose_platforms

choose_platforms()  # before any jax backend starts: no libtpu probing on CPU / GPU hosts

_EXPORTS = {"LlamaConfig": "model.config", "preset": "model.config", "load_hf": "io.hf",
            "save_hf": "io.hf", "exit_loss": "train.loss", "exit_logits": "model.transformer",
            "exit_hidden_states": "model.transformer", "init_params": "model.transformer",
            "generate": "infer.generate", "load_model": "io.loading"}

__all__ = [*_EXPORTS, "eval"]


def __getattr__(name: str):
    """An export (soft_jax.generate is the function) or a wing, imported on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
