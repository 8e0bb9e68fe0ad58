"""Orbax checkpoints of model parameters, written atomically, readable from three layouts.

Layouts `load_params` understands:
  * a converted checkpoint: `DIR/model_config.json` + `DIR/params/` (what `convert from-hf` writes)
  * an Orbax CheckpointManager directory: numbered step folders, each with `params/` and `meta/`
  * a training work dir holding such a manager under `checkpoints/` (its latest step is used)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from soft_jax.config import LlamaConfig

MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"


def atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of `final`; move it into place with `commit_dir`."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder onto `final` (which must be absent or empty)."""
    final = Path(final).absolute()
    if final.exists():
        final.rmdir()  # only an empty folder may be replaced
    os.replace(tmp, final)


def ensure_empty_output(path: Path, what: str = "output folder") -> None:
    """Refuse to write into a folder that already has files in it."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{what} {str(path)!r} exists and is not empty; choose a new path")


def save_params(path, config: LlamaConfig, params, tokenizer_dir: Path | None = None) -> Path:
    """Write `params` + the model config as a standalone Orbax checkpoint, atomically."""
    path = Path(path).absolute()
    ensure_empty_output(path, "checkpoint folder")
    tmp = atomic_dir(path)
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        (tmp / MODEL_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        commit_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _latest_step_dir(root: Path) -> Path | None:
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def resolve_checkpoint(path) -> Path:
    """The folder that holds `params/` for a checkpoint, manager or work dir path."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    for root in (path, path / "checkpoints"):
        if (root / "params").is_dir():
            return root
        if root.is_dir():
            step = _latest_step_dir(root)
            if step is not None and (step / "params").is_dir():
                return step
    raise FileNotFoundError(
        f"{str(path)!r} is not a soft_jax checkpoint: expected 'params/' and '{MODEL_CONFIG}', "
        "numbered step folders, or a work dir with 'checkpoints/'")


def read_model_config(ckpt: Path) -> LlamaConfig:
    """The model config stored beside a checkpoint's params (or in its manager's metadata)."""
    for candidate in (ckpt / MODEL_CONFIG, ckpt / "meta" / "metadata", ckpt.parent / MODEL_CONFIG,
                      ckpt.parent.parent / MODEL_CONFIG):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            return LlamaConfig.from_dict(data.get("model", data))
    raise FileNotFoundError(f"no {MODEL_CONFIG} found for checkpoint {str(ckpt)!r}")


def load_params(path, shardings=None, *, mesh=None, rules=None, dtype=None
                ) -> tuple[LlamaConfig, dict]:
    """(config, params) from any checkpoint layout.

    `shardings` (a tree matching the params) places them on a mesh; or give `mesh` (and
    optionally `rules`, default `sharding.RULES`) and each leaf is sharded by its logical
    axes. Either way every process reads only its own shards, whatever mesh wrote the
    checkpoint (restore 8-way fsdp onto fsdp x tensor, or onto one device for conversion).
    `dtype` (e.g. "float32") casts on restore.
    """
    ckpt = resolve_checkpoint(path)
    config = read_model_config(ckpt)
    with ocp.StandardCheckpointer() as ckptr:
        if shardings is None and mesh is None and dtype is None:
            params = ckptr.restore(ckpt / "params")
        else:
            meta = ckptr.metadata(ckpt / "params")
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            if shardings is None and mesh is not None:
                from soft_jax import sharding as shd

                shardings = shd.tree_shardings(tree, mesh, rules or shd.RULES)
            if shardings is None:  # only a cast: the default device
                shardings = jax.tree.map(
                    lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), tree)
            target = jax.tree.map(
                lambda m, s: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s), tree,
                shardings)
            params = ckptr.restore(ckpt / "params", target)
    return config, params


def tokenizer_dir_of(path) -> Path | None:
    """Tokenizer files saved with a checkpoint (or beside its work dir), if any."""
    ckpt = resolve_checkpoint(path)
    for candidate in (ckpt / TOKENIZER_DIR, ckpt.parent / TOKENIZER_DIR,
                      ckpt.parent.parent / TOKENIZER_DIR):
        if candidate.is_dir():
            return candidate
    return None


class TrainCheckpoints:
    """Orbax CheckpointManager for training: params, optimizer state and JSON metadata per step.

    Orbax writes each step into a temporary folder and renames it when complete, so a crash
    mid-save leaves the previous step as the latest restorable one.
    """

    def __init__(self, directory: Path, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, force: bool = False) -> None:
        """Start saving (async where enabled); `force` saves even off the usual interval."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state, meta) of `step`, shaped (and sharded) like the abstract trees."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
        return out["params"], out["opt_state"], out["meta"]

    def wait(self) -> None:
        """Block until any async save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
