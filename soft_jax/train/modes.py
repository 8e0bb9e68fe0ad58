"""What each training mode trains: SoFT (every exit), SFT (the last layer), ICT (per-exit
heads on a frozen model) and SortedNet (one random exit per step)."""

from __future__ import annotations

from soft_jax.model.config import LlamaConfig

MODES = ("soft", "sft", "ict", "sortednet")


def train_exits(config: LlamaConfig, mode: str) -> tuple[int, ...]:
    """The exits whose loss drives training in `mode` (SFT: the last layer only)."""
    return (config.num_layers,) if mode == "sft" else config.resolved_exits


def trainable_keys(params: dict, mode: str) -> tuple[str, ...]:
    """Top-level param groups the optimizer updates (ICT: only the per-exit heads)."""
    return ("exit_heads",) if mode == "ict" else tuple(sorted(params))


def exit_heads_for(mode: str, exits: tuple[int, ...]) -> int:
    """`LlamaConfig.num_exit_heads` of a run in `mode` with these (normalised) exits: ICT
    trains one LM head per non-final exit, the other modes share the final head."""
    return len(exits) - 1 if mode == "ict" else 0
