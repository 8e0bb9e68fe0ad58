"""GGUF files (llama.cpp's format) -> plain Hugging Face folders, dequantised by transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

from soft_jax.io.checkpoint import atomic_dir, commit_dir, ensure_empty_output
from soft_jax.io.families import ConversionError

GGUF_PACKAGES = ("gguf", "accelerate")
# general.architecture values of the families soft_jax converts (Mistral GGUFs say "llama")
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def gguf_fields(path, *keys: str) -> dict:
    """The header fields `keys` of a GGUF file (None where absent)."""
    _require_gguf_packages()
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ConversionError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    fields = {k: reader.get_field(k) for k in keys}
    return {k: None if f is None else f.contents() for k, f in fields.items()}


def gguf_architecture(path) -> str:
    """The `general.architecture` of a GGUF file (e.g. "llama"), read from its header."""
    arch = gguf_fields(path, "general.architecture")["general.architecture"]
    if arch is None:
        raise ConversionError(f"GGUF file {str(path)!r} has no general.architecture field")
    return str(arch)


def _require_gguf_packages() -> None:
    import importlib.util

    missing = [m for m in GGUF_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConversionError(f"reading GGUF files needs the packages {missing}: "
                              f"pip install {' '.join(missing)}")


def hf_from_gguf(gguf_file, out) -> Path:
    """Dequantise a GGUF of a supported family into a plain HF folder of its class (float32
    safetensors, config without `quantization_config`, tokenizer and chat template)."""
    path, out = Path(gguf_file), Path(out)
    ensure_empty_output(out)
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise ConversionError(f"GGUF file {str(path)!r} has architecture {arch!r} "
                              f"(general.architecture); supported: {GGUF_ARCHITECTURES}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    config = AutoConfig.from_pretrained(str(path.parent), **kw)
    # transformers reads no head_dim from qwen3 GGUFs; a decoupled one is in key_length
    key_length = gguf_fields(path, f"{arch}.attention.key_length")[f"{arch}.attention.key_length"]
    if key_length and hasattr(config, "head_dim"):
        config.head_dim = int(key_length)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), config=config,
                                                  dtype=torch.float32, **kw)
    hf_cfg = loaded.config.to_dict()
    hf_cfg.pop("quantization_config", None)
    plain = type(loaded)(type(loaded.config).from_dict(hf_cfg)).to(torch.float32)
    plain.load_state_dict(loaded.state_dict())  # strict: every tensor accounted for
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    tmp = atomic_dir(out)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out.absolute()
