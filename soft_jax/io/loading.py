"""One way to load a model: `load_model(path)` takes a soft_jax checkpoint, a training work dir,
a Hugging Face folder or a hub name and returns its config, params and tokenizer.

Checkpoints restore shard by shard into an explicit target for this process's devices (or
`mesh`) and are verified (checksum, no NaN / inf); see `checkpoint.load_params`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from soft_jax.model.config import LlamaConfig

TOKENIZER_MARKERS = (  # any of these beside the weights means a saved tokenizer
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class TokenizerError(ValueError):
    """The tokenizer asked for (or saved with the weights) cannot be loaded or does not fit."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A loaded model: config, params, tokenizer (None when none was asked for or saved),
    where the weights came from, its label in reports and whether prompts use the
    tokenizer's chat template. Unpacks as (config, params, tokenizer, source)."""

    config: LlamaConfig
    params: dict
    tokenizer: object | None
    source: str
    name: str = "model"
    chat: bool = False

    def __iter__(self):
        return iter((self.config, self.params, self.tokenizer, self.source))

    def replace(self, **changes) -> "LoadedModel":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def is_checkpoint_path(path) -> bool:
    """True when `path` names a soft_jax checkpoint or work dir rather than HF weights (a folder
    with config.json and safetensors, or a hub name)."""
    from soft_jax.io.hf import is_hf_folder
    from soft_jax.data.formats import is_hub_id

    p = Path(path)
    if p.exists():
        return not is_hf_folder(p)
    if is_hub_id(str(path)):
        return False
    raise FileNotFoundError(f"{str(path)!r} does not exist (expected a soft_jax checkpoint or "
                            "work dir, a Hugging Face folder or a hub name)")


def _saved_tokenizer(path, checkpoint: bool) -> str | None:
    """The tokenizer saved with the weights at `path` (a folder or hub name), if any."""
    if checkpoint:
        from soft_jax.io.checkpoint import tokenizer_dir_of

        folder = tokenizer_dir_of(path)
    else:
        folder = Path(path)
        if not folder.exists():
            return str(path)  # a hub name: its repo holds the tokenizer
    if folder is None or not any((folder / f).is_file() for f in TOKENIZER_MARKERS):
        return None
    return str(folder)


def _tokenizer(spec: str, vocab_size: int):
    from soft_jax.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise TokenizerError(f"cannot load a tokenizer from {spec!r} ({type(e).__name__}: "
                             f"{first})") from None
    if len(tok) > vocab_size:
        raise TokenizerError(f"tokenizer {spec!r} has {len(tok)} tokens but the model's "
                             f"vocab_size is {vocab_size}")
    return tok


def load_model(path, dtype: str | None = None, *, mesh=None, rules=None, exits=None,
               tokenizer: bool | str = True, allow_nonfinite: bool = False,
               allow_unverified: bool = False) -> LoadedModel:
    """(config, params, tokenizer, source) of a checkpoint, work dir, HF folder or hub name.

    `dtype` casts the params and sets the config's param and compute dtype (None: as stored);
    `mesh` (with `rules`, default sharding.RULES) shards the params by their logical axes;
    `exits` replaces the config's exits. `tokenizer`: True loads the one saved with the
    weights (None if there is none), False none, a string that tokenizer spec (a folder, hub
    name or gguf:FILE). Tokenizer problems raise TokenizerError (a ValueError).
    `allow_nonfinite` / `allow_unverified` accept checkpoint params holding NaN / inf, or
    without an integrity record (see `checkpoint.load_params`).
    """
    from soft_jax.io.checkpoint import load_params
    from soft_jax.io.hf import load_hf

    checkpoint = is_checkpoint_path(path)
    if checkpoint:
        config, params = load_params(path, mesh=mesh, rules=rules, dtype=dtype,
                                     allow_nonfinite=allow_nonfinite,
                                     allow_unverified=allow_unverified)
        config = config.replace(**({"exits": tuple(exits)} if exits is not None else {}),
                                **({"param_dtype": dtype, "dtype": dtype} if dtype else {}))
        source = f"soft_jax checkpoint {path}"
    else:
        config, params = load_hf(path, dtype, exits)
        if mesh is not None:
            from soft_jax.parallel import sharding as shd

            from soft_jax.model.transformer import param_axes

            shardings = shd.tree_shardings(params, param_axes(config), mesh, rules or shd.RULES)
            params = shd.place(params, shardings)
        source = f"Hugging Face folder {path}"
    spec = tokenizer if isinstance(tokenizer, str) else (
        _saved_tokenizer(path, checkpoint) if tokenizer else None)
    tok = _tokenizer(spec, config.vocab_size) if spec else None
    return LoadedModel(config, params, tok, source)

