"""Exit-loss recipes: how the multi-exit loss weights, distils and drops layers per step.

* ``paper``: the equal mean (1/|E|) sum_e CE_e of the SoFT paper (or `config.exit_weights`).
* ``depth``: w_e proportional to the exit's layer count e (deeper exits count more).
* ``last_boost``: weight 1 per exit and `last_weight` for the last layer (default |E| - 1:
  the last layer carries half the loss, as SFT's layer would with a same-sized other half).
* ``distill``: equal weights plus `distill_weight` x KL(p_last || p_e) per exit, the last
  layer's distribution a stop-gradient teacher (what greedy draft acceptance measures).
* ``last_boost_distill``: both: `last_boost`'s weights, and the KL term weighted by them.
* ``layerskip``: LayerSkip (Elhoushi et al. 2024): layer dropout at rate
  p_max * (2^(l / (L - 1)) - 1) for 0-based layer l (0 at the first layer, p_max at the
  last), per sequence, only in training; exit weights rising with depth, sum_{i<=e} i
  (the last layer weighted as the deepest exit); and the rotational early-exit curriculum:
  at step t only the exits whose index i has i mod R == t mod R are on, the last always.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
RECIPES = ("paper", "depth", "last_boost", "distill", "last_boost_distill", "layerskip")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The static settings of one exit-loss recipe (hashable: part of the jitted step)."""

    name: str = "paper"
    last_weight: float = 0.0  # last_boost: 0 = |E| - 1
    distill_weight: float = 1.0  # distill: the KL term's factor
    layer_dropout: float = 0.2  # layerskip: the rate at the last layer
    curriculum_period: int = 2  # layerskip: R of the rotational curriculum (1 = all exits on)

    @classmethod
    def from_config(cls, loss_cfg) -> "Recipe":
        """The recipe of a run config's `loss` section (soft_jax/train/run_config.py)."""
        return cls(str(loss_cfg.recipe), float(loss_cfg.last_weight),
                   float(loss_cfg.distill_weight), float(loss_cfg.layer_dropout),
                   int(loss_cfg.curriculum_period))

    @property
    def distill(self) -> float:
        """The KL factor of the loss (0 unless a distilling recipe)."""
        return self.distill_weight if self.name in ("distill", "last_boost_distill") else 0.0


def check_recipe(loss_cfg) -> None:
    """ValueError naming the bad `config.loss` recipe field."""
    if loss_cfg.recipe not in RECIPES:
        raise ValueError(f"config.loss.recipe={loss_cfg.recipe!r}; expected one of {RECIPES}")
    for name in ("last_weight", "distill_weight", "layer_dropout"):
        if float(loss_cfg[name]) < 0:
            raise ValueError(f"config.loss.{name} must be >= 0, got {loss_cfg[name]}")
    if float(loss_cfg.layer_dropout) >= 1:
        raise ValueError(f"config.loss.layer_dropout must be < 1, got {loss_cfg.layer_dropout}")
    if int(loss_cfg.curriculum_period) < 1:
        raise ValueError("config.loss.curriculum_period must be >= 1, got "
                         f"{loss_cfg.curriculum_period}")


def static_weights(recipe: Recipe, exits: tuple[int, ...]) -> np.ndarray | None:
    """Unnormalised per-exit weights of the recipe before any curriculum (None: the
    config's own, i.e. the paper's mean)."""
    e = np.asarray(exits, np.float32)
    if recipe.name == "depth":
        return e
    if recipe.name in ("last_boost", "last_boost_distill"):
        w = np.ones_like(e)
        w[-1] = recipe.last_weight or max(1, len(exits) - 1)
        return w
    if recipe.name == "layerskip":
        return e * (e + 1) / 2
    return None


def step_weights(recipe: Recipe, exits: tuple[int, ...], step: Array) -> Array | None:
    """The per-exit weights of training step `step` (traced), None for the config's own."""
    w = static_weights(recipe, exits)
    if w is None:
        return None
    w = jnp.asarray(w)
    if recipe.name == "layerskip" and recipe.curriculum_period > 1:
        idx = jnp.arange(len(exits))
        on = (idx % recipe.curriculum_period == step % recipe.curriculum_period)
        w = w * (on | (idx == len(exits) - 1))
    return w


def dropout_rates(recipe: Recipe, num_layers: int) -> np.ndarray:
    """Per-layer skip probability, rising exponentially from 0 to `layer_dropout`."""
    if recipe.name != "layerskip" or not recipe.layer_dropout:
        return np.zeros((num_layers,), np.float32)
    l = np.arange(num_layers, dtype=np.float32)
    return (recipe.layer_dropout * (2.0 ** (l / max(1, num_layers - 1)) - 1.0)).astype(np.float32)


def layer_keep(recipe: Recipe, rng: Array, num_layers: int, batch: int) -> Array | None:
    """Bernoulli keep mask [layers, batch] of the layer dropout (None: no dropout)."""
    rates = dropout_rates(recipe, num_layers)
    if not rates.any():
        return None
    return jax.random.bernoulli(jax.random.fold_in(rng, 1), 1.0 - jnp.asarray(rates)[:, None],
                                (num_layers, batch))
