"""GGUF files (llama.cpp's format) -> plain Hugging Face folders, dequantised by transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

from soft_jax.io.checkpoint import atomic_dir, commit_dir, ensure_empty_output
from soft_jax.io.families import ConversionError

GGUF_PACKAGES = ("gguf", "accelerate")
# general.architecture values of the families soft_jax converts (Mistral GGUFs say "llama")
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def _reader(path: Path):
    """The parsed header of a GGUF file (its tensors stay memory-mapped, unread)."""
    _require_gguf_packages()
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ConversionError(f"{str(path)!r} is not a readable GGUF file: {e}") from None


def _field(reader, key: str):
    """One header field's value, None where absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _architecture(reader, path: Path) -> str:
    """The `general.architecture` of a GGUF header (e.g. "llama")."""
    arch = _field(reader, "general.architecture")
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
    header = _reader(path)
    arch = _architecture(header, path)
    if arch not in GGUF_ARCHITECTURES:
        raise ConversionError(f"GGUF file {str(path)!r} has architecture {arch!r} "
                              f"(general.architecture); supported: {GGUF_ARCHITECTURES}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    config = AutoConfig.from_pretrained(str(path.parent), **kw)
    # transformers reads no head_dim from qwen3 GGUFs; a decoupled one is in key_length
    key_length = _field(header, f"{arch}.attention.key_length")
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
