"""Model configuration: the LLaMA-family shape (with the Llama 3, Mistral, Qwen2 and Qwen3
options), dtypes, exits and named presets."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from soft_jax.model.layer_counts import normalize_exits, pair_exit_weights

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("default", "linear", "llama3")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # which HF class a model converts to
# What each remat policy keeps of a decoder layer for the backward pass, besides the layer
# input: the checkpoint_name tags of layers.py (q/k after RoPE). None: no remat, every
# intermediate stays alive. `save_dots` keeps every matmul output (they are all tagged);
# `offload_dots` moves them to host memory, keeping none on the device. model.remat_policy
# turns a name into the jax policy; soft_jax.train.memory counts the bytes of the kept tags.
# With qk_norm the projections before the per-head norm are tagged too (its backward needs
# them); a tag a config does not produce costs nothing.
ATTN_TAGS = ("query_proj", "key_proj", "value_proj", "attn_out", "query_pre_norm",
             "key_pre_norm")
MLP_TAGS = ("mlp_gate", "mlp_up", "mlp_out")
REMAT_SAVES: dict[str, tuple[str, ...] | None] = {
    "none": None,
    "full": (),
    "save_dots": ATTN_TAGS + MLP_TAGS,
    "save_qkv_out": ATTN_TAGS,
    "save_qkv_out_gate_up": ATTN_TAGS + ("mlp_gate", "mlp_up"),
    "offload_dots": (),
}
REMAT_POLICIES = tuple(REMAT_SAVES)


class RopeScaling(NamedTuple):
    """RoPE frequency scaling (HF `rope_scaling`): `linear` divides every frequency by
    `factor`; `llama3` divides the long wavelengths by `factor`, keeps the short ones and
    blends between `low_freq_factor` and `high_freq_factor` (Llama 3.1's rule)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_position_embeddings: int = 0

    @classmethod
    def of(cls, value) -> "RopeScaling | None":
        """A RopeScaling from itself, its dict, or its fields in order (saved configs)."""
        if value is None or isinstance(value, cls):
            return value
        return cls(**value) if isinstance(value, dict) else cls(*value)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a LLaMA-family decoder with sorted exits (hashable, jit-static)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple | None = 2
    pad_token_id: int | None = None
    exits: tuple[int, ...] | None = None  # 1-based layer counts; None = last layer only
    exit_weights: tuple[float, ...] | None = None  # None = equal (the paper's mean)
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_impl: str | None = None  # None = jax picks (cuDNN on GPU when it can), "xla", "cudnn"
    num_exit_heads: int = 0  # ICT baseline: separate LM heads for the non-final exits
    family: str = "llama"  # one of FAMILIES: the HF class of exports
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # a query sees the last `sliding_window` keys (Mistral)

    def __post_init__(self):
        if self.exits is not None:
            object.__setattr__(self, "exits", tuple(int(e) for e in self.exits))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.exit_weights is not None:  # pair each weight with its exit, then sort the pairs
            exits, weights = pair_exit_weights(self.exits, self.exit_weights, self.num_layers)
            object.__setattr__(self, "exits", exits)
            object.__setattr__(self, "exit_weights", weights)
        object.__setattr__(self, "rope_scaling", RopeScaling.of(self.rope_scaling))
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def kv_head_dim(self) -> int:
        """Per-head width (HF `head_dim`, default hidden_size // num_heads)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def resolved_exits(self) -> tuple[int, ...]:
        """The exits with the last layer always included."""
        return normalize_exits(self.exits, self.num_layers)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-serialisable form, inverse of `from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Build from `to_dict` output; unknown keys are an error naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown LlamaConfig field(s) {unknown}; known: {sorted(fields)}")
        d = dict(d)
        for k in ("exits", "exit_weights"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}; set head_dim explicitly")
        if self.kv_head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.kv_head_dim} must be even for RoPE")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"LlamaConfig.{name}={getattr(self, name)!r}; expected one of "
                                 f"{sorted(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat_policy={self.remat_policy!r}; expected one of "
                             f"{REMAT_POLICIES}")
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_scaling.rope_type!r} "
                             f"(rope_scaling.rope_type); supported: {ROPE_TYPES}")
        if self.family not in FAMILIES:
            raise ValueError(f"LlamaConfig.family={self.family!r}; expected one of {FAMILIES}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise ValueError(f"LlamaConfig.sliding_window={self.sliding_window!r}; expected a "
                             "positive int or None")
        exits = normalize_exits(self.exits, self.num_layers)
        if self.exit_weights is not None and len(self.exit_weights) != len(exits):
            raise ValueError(f"LlamaConfig.exit_weights has {len(self.exit_weights)} entries but "
                             f"there are {len(exits)} exits {exits}")
        if self.num_exit_heads not in (0, len(exits) - 1):
            raise ValueError(f"LlamaConfig.num_exit_heads={self.num_exit_heads}; expected 0 or "
                             f"{len(exits) - 1} (one per non-final exit)")


def _paper_exits(num_layers: int) -> tuple[int, ...]:
    """Exits from ~30% depth every 10% (the paper's spacing), rounded half up."""
    return tuple(sorted({int(num_layers * k / 10 + 0.5) for k in range(3, 11)}))


PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=4,
                 num_heads=4, num_kv_heads=2, max_position_embeddings=512, exits=(2, 3, 4)),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
                  num_heads=8, num_kv_heads=8, max_position_embeddings=2048,
                  exits=(1, 2, 3, 4, 5, 6, 7, 8)),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, exits=(6, 12, 18, 24, 30)),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_layers=22, num_heads=32, num_kv_heads=4, max_position_embeddings=2048,
                           exits=(8, 10, 12, 14, 16, 18, 20, 22)),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, exits=(8, 12, 16, 20, 24, 28, 32)),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_layers=40, num_heads=40, num_kv_heads=40,
                       exits=(12, 16, 20, 24, 28, 32, 36, 40)),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                       num_layers=80, num_heads=64, num_kv_heads=8,
                       exits=(24, 32, 40, 48, 56, 64, 72, 80)),
    # Llama 3.x, Mistral, Qwen2.5 and Qwen3 with the paper's exit spacing
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                        rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
                        max_position_embeddings=131072, tie_word_embeddings=True,
                        bos_token_id=128000, eos_token_id=128001,
                        exits=_paper_exits(16)),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                        max_position_embeddings=131072, bos_token_id=128000,
                        eos_token_id=128001, exits=_paper_exits(32)),
    "mistral-7b": dict(family="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       sliding_window=4096, max_position_embeddings=32768,
                       exits=_paper_exits(32)),
    "qwen2.5-0.5b": dict(family="qwen2", qkv_bias=True, vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=151643,
                         exits=_paper_exits(24)),
    "qwen2.5-7b": dict(family="qwen2", qkv_bias=True, vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                       bos_token_id=None, eos_token_id=151643,
                       exits=_paper_exits(28)),
    "qwen3-0.6b": dict(family="qwen3", qk_norm=True, vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=40960, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=151645,
                       exits=_paper_exits(28)),
    "qwen3-8b": dict(family="qwen3", qk_norm=True, vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                     head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, bos_token_id=None, eos_token_id=151645,
                     exits=_paper_exits(36)),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
    """A named model shape (see PRESETS), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
