"""Model FLOPs of a training step: matmuls and causal attention, forward x 3 where gradients
flow (remat recompute is not counted: these are model FLOPs, not the hardware's).

Per token, T = sequence length: 6*N + 6*L*T*D + 6*D*V*(E - 1), N = matmul parameters of one
SFT forward (layers, final norm, LM head; the embedding lookup and ICT exit heads are not
counted), 6*L*T*D = causal attention scores and values, 6*D*V*(E-1) = a head at each of the
E - 1 extra exits. ICT trains only the exit heads: the frozen body and final head run forward.
"""

from __future__ import annotations

from soft_jax.model.config import LlamaConfig
from soft_jax.train.modes import train_exits


def matmul_params(config: LlamaConfig) -> int:
    """N: parameters of the matmuls in one SFT forward (layers, final norm, shared head)."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.kv_head_dim
    attn = d * config.num_heads * hd * 2 + d * config.num_kv_heads * hd * 2  # q, o, k, v
    layer = attn + 3 * d * f + 2 * d
    return config.num_layers * layer + d + d * config.vocab_size


def flops_per_token(config: LlamaConfig, seq: int, n_exits: int) -> float:
    """6N + 6*L*T*D + 6*D*V*(E-1) (see the module docstring)."""
    d, v, nl = config.hidden_size, config.vocab_size, config.num_layers
    return 6 * matmul_params(config) + 6 * nl * seq * d + 6 * d * v * (n_exits - 1)


def step_flops(config: LlamaConfig, mode: str, tokens: int, seq: int) -> float:
    """Model FLOPs of one step of `mode` over `tokens` tokens in rows of `seq`."""
    n_exits = len(train_exits(config, mode))
    if mode != "ict":
        return tokens * flops_per_token(config, seq, n_exits)
    d, v, nl = config.hidden_size, config.vocab_size, config.num_layers
    return tokens * (2 * matmul_params(config) + 2 * nl * seq * d + 6 * d * v * (n_exits - 1))
