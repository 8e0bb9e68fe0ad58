"""soft_jax: Sorted Fine-Tuning (SoFT) of LLaMA-family models in JAX/Flax.

The exports and submodules load on first use, so `python -m soft_jax.convert|generate|train|...`
runs a module that is not imported yet (no runpy warning) and `import soft_jax` stays cheap.
"""

import importlib

_EXPORTS = {"LlamaConfig": "config", "preset": "config", "load_hf": "convert",
            "save_hf": "convert", "exit_loss": "loss", "exit_logits": "model",
            "exit_hidden_states": "model", "init_params": "model", "generate": "generation",
            "load_model": "loading"}

__all__ = [*_EXPORTS, "eval"]


def __getattr__(name: str):
    """An export (soft_jax.generate is the function) or a submodule, imported on first use."""
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
