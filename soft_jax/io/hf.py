"""Hugging Face folders (Llama, Mistral, Qwen2, Qwen3; see io/families.py) <-> soft_jax
params, both ways: configs, tensors, sub-model export (`save_hf(..., exit_layer=n)`) and HF
folder -> checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from soft_jax.io.checkpoint import atomic_dir, commit_dir, ensure_empty_output
from soft_jax.io.families import ConversionError, family_fields, family_options
from soft_jax.model.config import DTYPES, LlamaConfig, RopeScaling
from soft_jax.model.exits import head_kernel, uses_shared_head
from soft_jax.model.layer_counts import layer_count

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

# HF name (per layer, under model.layers.{i}.) -> (params path in the layer stack, kind)
_LAYER_KEYS = {
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), "q"),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), "kv"),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), "kv"),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), "o"),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), "linear"),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), "linear"),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), "linear"),
    "input_layernorm.weight": (("input_norm", "scale"), "norm"),
    "post_attention_layernorm.weight": (("post_attn_norm", "scale"), "norm"),
}
_BIAS_KEYS = {f"self_attn.{p}_proj.bias": (("attn", f"{p}_proj", "bias"), kind)
              for p, kind in (("q", "q_bias"), ("k", "kv_bias"), ("v", "kv_bias"))}
_QK_NORM_KEYS = {f"self_attn.{p}_norm.weight": (("attn", f"{p}_norm", "scale"), "head_norm")
                 for p in ("q", "k")}


def layer_keys(config: LlamaConfig) -> dict:
    """The per-layer HF tensors of this config (its options add biases, q/k norms)."""
    return {**_LAYER_KEYS, **(_BIAS_KEYS if config.qkv_bias else {}),
            **(_QK_NORM_KEYS if config.qk_norm else {})}


# ------------------------------------------------------------------------ config
def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    params = {**scaling, **rope}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", float(params["factor"]))
    if rope_type == "llama3":
        try:
            return float(theta), RopeScaling(
                "llama3", float(params["factor"]), float(params["low_freq_factor"]),
                float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConversionError(f"config.json rope_parameters: llama3 rope needs {e}") from None
    raise ConversionError(f"config.json: unsupported rope type {rope_type!r} "
                          "(rope_parameters.rope_type); supported: default, linear, llama3")


def config_from_hf(hf: dict, dtype: str = "float32", exits=None) -> LlamaConfig:
    """LlamaConfig from a HF config.json dict (rope_theta or v5 rope_parameters style)."""
    try:
        options = family_options(hf)
        theta, scaling = _rope_from_hf(hf)
        heads = int(hf["num_attention_heads"])
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=hf.get("head_dim"), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"), exits=exits, param_dtype=dtype, dtype=dtype,
            **options)
    except KeyError as e:
        raise ConversionError(f"config.json is missing the field {e.args[0]!r}") from None


def config_to_hf(config: LlamaConfig, dtype: str) -> dict:
    """A config.json of `config.family`'s class that transformers 5 (rope_parameters) and 4.x
    (rope_theta) both read."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = config.rope_scaling
    if scaling is not None:
        rope.update(rope_type=scaling.rope_type, factor=scaling.factor)
        if scaling.rope_type == "llama3":
            rope.update(low_freq_factor=scaling.low_freq_factor,
                        high_freq_factor=scaling.high_freq_factor,
                        original_max_position_embeddings=scaling.original_max_position_embeddings)
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.kv_head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": config.bos_token_id,
        "eos_token_id": (list(config.eos_token_id) if isinstance(config.eos_token_id, tuple)
                         else config.eos_token_id),
        "pad_token_id": config.pad_token_id, "rope_parameters": rope,
        "rope_theta": config.rope_theta, "rope_scaling": None if config.rope_scaling is None
        else {k: v for k, v in rope.items() if k != "rope_theta"},
        "dtype": dtype, "torch_dtype": dtype, **family_fields(config),
    }


# ------------------------------------------------------------------------ tensors
def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a single-file or sharded (`model.safetensors.index.json`) folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise ConversionError(f"shard {shard!r} named in {index.name} is missing")
            tensors.update(load_file(folder / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConversionError(f"tensors {missing[:5]} listed in {index.name} not found in shards")
        return tensors
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    raise ConversionError(f"no model.safetensors or model.safetensors.index.json in {str(folder)!r}")


def _take(tensors: dict, key: str, shape: tuple) -> np.ndarray:
    if key not in tensors:
        raise ConversionError(f"missing tensor {key!r} (expected shape {shape})")
    t = tensors.pop(key)
    if tuple(t.shape) != tuple(shape):
        raise ConversionError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _hf_layer_shape(config: LlamaConfig, kind: str) -> tuple:
    d, hd = config.hidden_size, config.kv_head_dim
    return {"q": (config.num_heads * hd, d), "kv": (config.num_kv_heads * hd, d),
            "o": (d, config.num_heads * hd), "norm": (d,), "q_bias": (config.num_heads * hd,),
            "kv_bias": (config.num_kv_heads * hd,), "head_norm": (hd,)}.get(kind)


def _to_kernel(config: LlamaConfig, w: np.ndarray, kind: str) -> np.ndarray:
    d, hd = config.hidden_size, config.kv_head_dim
    if kind in ("norm", "head_norm"):
        return w
    if kind == "q_bias":
        return w.reshape(config.num_heads, hd)
    if kind == "kv_bias":
        return w.reshape(config.num_kv_heads, hd)
    if kind == "q":
        return w.T.reshape(d, config.num_heads, hd)
    if kind == "kv":
        return w.T.reshape(d, config.num_kv_heads, hd)
    if kind == "o":
        return w.T.reshape(config.num_heads, hd, d)
    return w.T


def _from_kernel(w: np.ndarray, kind: str) -> np.ndarray:
    if kind in ("norm", "head_norm"):
        return w
    if kind in ("q_bias", "kv_bias"):
        return w.reshape(-1)
    if kind in ("q", "kv"):
        return w.reshape(w.shape[0], -1).T
    if kind == "o":
        return w.reshape(-1, w.shape[-1]).T
    return w.T


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def params_from_hf(config: LlamaConfig, tensors: dict[str, np.ndarray], dtype=np.float32) -> dict:
    """soft_jax params from HF state-dict tensors; every key checked for presence and shape."""
    tensors = {k: v for k, v in tensors.items() if not _IGNORED_KEYS.match(k)}
    d, v, f = config.hidden_size, config.vocab_size, config.intermediate_size
    cast = lambda a: np.asarray(a).astype(dtype)  # noqa: E731
    params = {"embed": {"embedding": cast(_take(tensors, "model.embed_tokens.weight", (v, d)))},
              "final_norm": {"scale": cast(_take(tensors, "model.norm.weight", (d,)))}}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied exports repeat it
    else:
        params["lm_head"] = {"kernel": cast(_take(tensors, "lm_head.weight", (v, d))).T}
    layers: dict = {}
    for name, (path, kind) in layer_keys(config).items():
        shape = _hf_layer_shape(config, kind) or ((f, d) if "down" not in name else (d, f))
        stacked = [_to_kernel(config, cast(_take(tensors, f"model.layers.{i}.{name}", shape)), kind)
                   for i in range(config.num_layers)]
        _set(layers, path, np.stack(stacked))
    params["layers"] = layers
    if tensors:
        raise ConversionError(f"unexpected tensors {sorted(tensors)[:8]} for a "
                              f"{config.num_layers}-layer {config.family} model")
    return params


def params_to_hf(config: LlamaConfig, params: dict, dtype=None) -> dict[str, np.ndarray]:
    """HF state-dict tensors (numpy) for `params`; `dtype` None keeps each array's dtype."""
    def out(a):
        a = np.asarray(jax.device_get(a))
        return np.ascontiguousarray(a if dtype is None else a.astype(dtype))
    t = {"model.embed_tokens.weight": out(params["embed"]["embedding"]),
         "model.norm.weight": out(params["final_norm"]["scale"])}
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = out(np.asarray(jax.device_get(params["lm_head"]["kernel"])).T)
    for name, (path, kind) in layer_keys(config).items():
        stacked = np.asarray(jax.device_get(_get(params["layers"], path)))
        for i in range(config.num_layers):
            t[f"model.layers.{i}.{name}"] = out(_from_kernel(stacked[i], kind))
    return t


def check_exit(config: LlamaConfig, exit_layer) -> int:
    """`exit_layer` as an int, or a ConversionError if it is not a layer count of the model."""
    return layer_count(exit_layer, config.num_layers, error=ConversionError)


def submodel(config: LlamaConfig, params: dict, exit_layer: int) -> tuple[LlamaConfig, dict]:
    """The standalone `exit_layer`-layer model: first n layers, final norm, that exit's head."""
    n = check_exit(config, exit_layer)
    tied = config.tie_word_embeddings and uses_shared_head(config, params, n)
    sub = {"embed": params["embed"], "final_norm": params["final_norm"],
           "layers": jax.tree.map(lambda a: a[:n], params["layers"])}
    if not tied:
        sub["lm_head"] = {"kernel": head_kernel(config, params, n)}
    exits = tuple(e for e in config.resolved_exits if e <= n)
    sub_config = config.replace(num_layers=n, exits=exits, exit_weights=None,
                                tie_word_embeddings=tied, num_exit_heads=0)
    return sub_config, sub


# ------------------------------------------------------------------------ public API
def is_hf_folder(path) -> bool:
    """True for a folder with a config.json and safetensors weights."""
    p = Path(path)
    return (p / "config.json").is_file() and any(
        (p / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json"))


def _resolve_hf_folder(path) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"Hugging Face folder {str(path)!r} does not exist")
    from huggingface_hub import snapshot_download  # a hub name: users with the network

    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors",
                                                             "tokenizer*", "*.jinja"]))


def load_hf(path, dtype: str | None = "float32", exits=None) -> tuple[LlamaConfig, dict]:
    """(config, params) from a HF folder or hub name of a supported family (io/families.py).

    `dtype` is the parameter dtype ("float32", "bfloat16", "float16"); None keeps the file's.
    """
    folder = _resolve_hf_folder(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"no config.json in {str(folder)!r}")
    hf = json.loads(cfg_file.read_text())
    tensors = read_safetensors(folder)
    if dtype is None:
        dtype = str(np.dtype(tensors["model.embed_tokens.weight"].dtype)) \
            if "model.embed_tokens.weight" in tensors else "float32"
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} not supported; expected one of {sorted(DTYPES)}")
    config = config_from_hf(hf, dtype, exits)
    params = params_from_hf(config, tensors, NP_DTYPES[dtype])
    return config, jax.tree.map(jnp.asarray, params)


def _write_safetensors(folder: Path, tensors: dict, max_shard_bytes: int) -> None:
    total = sum(t.nbytes for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_hf(config: LlamaConfig, params: dict, path, exit_layer: int | None = None,
            dtype: str | None = None, tokenizer_dir=None,
            max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write a HF folder of the config's family atomically (the `exit_layer`-layer sub-model if given).

    `dtype` None keeps the parameters' dtype; tokenizer files in `tokenizer_dir` are copied.
    """
    path = Path(path)
    ensure_empty_output(path)
    if dtype is not None and dtype not in NP_DTYPES:
        raise ConversionError(f"dtype {dtype!r} not supported; expected one of {sorted(NP_DTYPES)}")
    if exit_layer is not None:
        config, params = submodel(config, params, exit_layer)
    tensors = params_to_hf(config, params, None if dtype is None else NP_DTYPES[dtype])
    out_dtype = dtype or str(next(iter(tensors.values())).dtype)
    tmp = atomic_dir(path)
    try:
        _write_safetensors(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config, out_dtype), indent=2))
        if tokenizer_dir is not None:
            _copy_tokenizer_files(Path(tokenizer_dir), tmp)
        commit_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path.absolute()


def _copy_tokenizer_files(src: Path, dst: Path) -> bool:
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(src / n, dst / n)
    return True


def check_tokenizer_fits(folder: Path, vocab_size: int) -> None:
    """Refuse a HF folder whose tokenizer has more tokens than the model embeds: the
    checkpoint would be one that generate and eval refuse. (A tokenizer that does not load
    is copied as it is, as before.)"""
    from soft_jax.data.tokenizer import load_tokenizer

    try:
        n = len(load_tokenizer(str(folder)))
    except (OSError, ValueError):
        return
    if n > vocab_size:
        raise ConversionError(f"the tokenizer in {str(folder)!r} has {n} tokens but config.json "
                              f"vocab_size is {vocab_size}; ids past it have no embedding")


def checkpoint_from_hf(hf, out, dtype: str | None = "float32", exits=None) -> Path:
    """HF folder or hub name -> Orbax checkpoint + model config (+ tokenizer files)."""
    from soft_jax.io.checkpoint import save_params

    ensure_empty_output(Path(out), "checkpoint folder")
    config, params = load_hf(hf, dtype, exits)
    folder = _resolve_hf_folder(hf)
    check_tokenizer_fits(folder, config.vocab_size)
    tok_tmp = atomic_dir(Path(out).with_name(Path(out).name + "-tok"))
    try:
        has_tok = _copy_tokenizer_files(folder, tok_tmp)
        return save_params(out, config, params, tok_tmp if has_tok else None)
    finally:
        shutil.rmtree(tok_tmp, ignore_errors=True)
