"""The Hugging Face model families soft_jax converts, one row each: which transformers class,
which `LlamaConfig` options its config.json turns on, and what it refuses by name.

Every family is the LLaMA block plus options (`qkv_bias`, `qk_norm`, `head_dim`,
`sliding_window`); anything else a config asks for is refused in one line naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


class ConversionError(ValueError):
    """A Hugging Face folder or checkpoint that cannot be converted, with the reason."""


# model_type -> why it is refused (families close to LLaMA that need more than the options)
REFUSED_MODEL_TYPES = {
    "gemma": "Gemma-style norms (1 + weight) and scaled embeddings",
    "gemma2": "Gemma-style norms, logit soft-capping and alternating windows",
    "gemma3": "Gemma-style norms and alternating sliding windows",
    "mixtral": "mixture-of-experts MLPs",
    "qwen2_moe": "mixture-of-experts MLPs",
    "qwen3_moe": "mixture-of-experts MLPs",
    "phi3": "fused qkv / gate_up projections",
}


def _off(hf: dict, key: str, ok) -> None:
    if hf.get(key, ok) != ok:
        raise ConversionError(f"config.json: {key}={hf[key]!r} is not supported (expected {ok!r})")


def _llama_options(hf: dict) -> dict:
    _off(hf, "attention_bias", False)
    if hf.get("sliding_window") is not None:
        raise ConversionError(f"config.json: sliding_window={hf['sliding_window']!r} is set but "
                              "LlamaForCausalLM ignores it (a Mistral model labelled as "
                              "Llama?); fix architectures/model_type or drop the field")
    return {}


def _mistral_options(hf: dict) -> dict:
    if hf.get("layer_types"):
        raise ConversionError("config.json: layer_types (alternating attention, Ministral) is "
                              "not supported")
    window = hf.get("sliding_window")
    return {"sliding_window": None if window is None else int(window)}


def _qwen_window(hf: dict) -> int | None:
    """Qwen2/3 slide only layers >= max_window_layers when use_sliding_window: one window for
    all layers or none; a mix is refused."""
    if not hf.get("use_sliding_window"):
        return None
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", n)) else "full_attention"
        for i in range(n)]
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"}:
        return int(hf["sliding_window"])
    raise ConversionError("config.json: use_sliding_window with max_window_layers / layer_types "
                          "mixes sliding and full attention layers; not supported")


def _qwen2_options(hf: dict) -> dict:
    return {"qkv_bias": True, "sliding_window": _qwen_window(hf)}


def _qwen3_options(hf: dict) -> dict:
    _off(hf, "attention_bias", False)
    return {"qk_norm": True, "sliding_window": _qwen_window(hf)}


def _llama_fields(config) -> dict:
    return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def _mistral_fields(config) -> dict:
    return {"sliding_window": config.sliding_window}


def _qwen_fields(config) -> dict:
    window = config.sliding_window
    return {"use_sliding_window": window is not None, "sliding_window": window,
            "max_window_layers": 0 if window is not None else config.num_layers,
            "layer_types": ["sliding_attention" if window else "full_attention"]
            * config.num_layers}


def _qwen3_fields(config) -> dict:
    return {"attention_bias": False, **_qwen_fields(config)}


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF family: `LlamaConfig.family`, its transformers class and model_type, the
    options its config.json sets, and the extra config.json fields of an export."""

    name: str
    architecture: str
    model_type: str
    options: Callable[[dict], dict]  # HF config dict -> LlamaConfig option fields
    fields: Callable[..., dict]  # LlamaConfig -> family-specific config.json fields


FAMILIES = {f.name: f for f in (
    Family("llama", "LlamaForCausalLM", "llama", _llama_options, _llama_fields),
    Family("mistral", "MistralForCausalLM", "mistral", _mistral_options, _mistral_fields),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", _qwen2_options, _qwen_fields),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", _qwen3_options, _qwen3_fields),
)}
SUPPORTED_ARCHITECTURES = tuple(f.architecture for f in FAMILIES.values())


def family_of(hf: dict) -> Family:
    """The family of a HF config dict (by model_type, then architectures), or a one-line
    ConversionError naming what is unsupported."""
    model_type = hf.get("model_type", "llama")
    if model_type in REFUSED_MODEL_TYPES:
        raise ConversionError(f"config.json: model_type {model_type!r} is not supported "
                              f"({REFUSED_MODEL_TYPES[model_type]})")
    archs = set(hf.get("architectures") or [])
    for family in FAMILIES.values():
        if family.model_type == model_type and (not archs or family.architecture in archs):
            return family
    raise ConversionError(f"config.json: unsupported architecture {sorted(archs) or model_type}"
                          f" (architectures/model_type); expected one of {SUPPORTED_ARCHITECTURES}")


def family_options(hf: dict) -> dict:
    """LlamaConfig fields (family and options) for a HF config dict; refusals raise."""
    family = family_of(hf)
    _off(hf, "hidden_act", "silu")
    _off(hf, "mlp_bias", False)
    for key in ("num_local_experts", "num_experts"):
        if hf.get(key):
            raise ConversionError(f"config.json: {key}={hf[key]!r}: mixture-of-experts models "
                                  "are not supported")
    return {"family": family.name, **family.options(hf)}


def family_fields(config) -> dict:
    """The config.json fields that name and configure `config.family`'s transformers class."""
    family = FAMILIES[config.family]
    return {"architectures": [family.architecture], "model_type": family.model_type,
            **family.fields(config)}
