"""GGUF files (llama.cpp's format) -> plain Hugging Face folders, dequantised by transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

from soft_jax.io.checkpoint import atomic_dir, commit_dir, ensure_empty_output
from soft_jax.io.families import ConversionError

GGUF_PACKAGES = ("gguf", "accelerate")
# general.architecture values of the families soft_jax converts (Mistral GGUFs say "llama")
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def gguf_architecture(path) -> str:
    """The `general.architecture` of a GGUF file (e.g. "llama"), read from its header."""
    _require_gguf_packages()
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        field = gguf.GGUFReader(str(path)).get_field("general.architecture")
    except (ValueError, OSError) as e:
        raise ConversionError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    if field is None:
        raise ConversionError(f"GGUF file {str(path)!r} has no general.architecture field")
    return str(field.contents())


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
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
