"""Orbax checkpoints of model parameters, written atomically, readable from three layouts.

Layouts `load_params` understands:
  * a converted checkpoint: `DIR/model_config.json` + `DIR/params/` (what `convert from-hf` writes)
  * an Orbax CheckpointManager directory: numbered step folders, each with `params/` and `meta/`
  * a training work dir holding such a manager under `checkpoints/` (its latest step is used)

Every save records the finiteness and an integer checksum (`tree_integrity`) of the params
(and, for training steps, of the optimizer state); every restore goes into an explicit target
tree sharded for the devices of *this* process (so a checkpoint written on any mesh / process
count loads anywhere) and is verified against that record. A step without its record is
unverified and treated like one that fails: it is skipped with a warning for the previous
one, unless the caller allows unverified checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from soft_jax.model.config import LlamaConfig
from soft_jax.utils.log import filtered, log, one_line

MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
INTEGRITY = "integrity.json"  # beside `params/` of a converted checkpoint (train: in meta)
TRAIN_TREES = ("params", "opt_state")  # what a training step holds, each with its checksum
ASIDE_LABELS = ("corrupt", "unverified", "diverged")  # step folders moved out of the way
# The trees a step's metadata says it recorded ("recorded"); steps written before it existed
# (119a8a3 and older) recorded the params alone.
LEGACY_RECORDED = ("params",)


class CheckpointError(RuntimeError):
    """No readable, verified checkpoint where one was expected."""


class NonFiniteParamsError(CheckpointError):
    """Params hold NaN or inf (refused on save; on convert unless --allow-nonfinite)."""


class UnverifiedCheckpointError(CheckpointError):
    """A checkpoint without its integrity record: nothing proves its files are intact."""


UNVERIFIED = "no integrity record, so its files cannot be verified"
ALLOW_UNVERIFIED = "allow_unverified / --allow-unverified to load it anyway"


_BITS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _fingerprint(params):
    def checksum(x):  # wrapping sum of the raw bits: exact on any mesh, any single bit flip shows
        bits = jax.lax.bitcast_convert_type(x, _BITS[x.dtype.itemsize])
        return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)

    leaves = jax.tree.leaves(params)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                                if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.bool_(True)]))
    return finite, jax.tree.map(checksum, params)


def tree_integrity(tree) -> dict:
    """{"finite": bool, "checksum": {leaf path: uint32}} of a (possibly sharded) tree of arrays
    (params or optimizer state)."""
    finite, sums = jax.device_get(_fingerprint(tree))
    return {"finite": bool(finite), "checksum": {
        jax.tree_util.keystr(k): int(v) for k, v in jax.tree_util.tree_leaves_with_path(sums)}}


def integrity_problem(tree, record: dict | None, allow_nonfinite: bool = False,
                      what: str = "params", nonfinite_hint: str = "") -> str | None:
    """Why `tree` (named `what` in the answer, `nonfinite_hint` after NaN / inf) does not
    match the integrity `record` saved with it (None: it does). Without a record only
    finiteness is checked: whether an unverified tree is acceptable is the caller's decision."""
    got = tree_integrity(tree)
    if not got["finite"] and not allow_nonfinite:
        return f"{what} hold NaN or inf{nonfinite_hint}"
    if record is None:
        return None
    bad = [k for k, v in record.get("checksum", {}).items() if got["checksum"].get(k) != v]
    if bad or set(got["checksum"]) != set(record.get("checksum", {})):
        return f"{what} checksum mismatch in {bad[:3] or 'the tree structure'}"
    return None


def atomic_dir(final: Path) -> Path:
    """A fresh, empty temporary sibling folder of `final` (created here); move it into place
    with `commit_dir`. A parent that cannot be written is a PermissionError naming `final`."""
    final = Path(final).absolute()
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise PermissionError(f"cannot write {str(final)!r}: its folder {str(final.parent)!r} "
                              f"is not writable ({e.strerror})") from None
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder onto `final` (which must be absent or empty)."""
    final = Path(final).absolute()
    if final.exists():
        final.rmdir()  # only an empty folder may be replaced
    os.replace(tmp, final)


def ensure_empty_output(path: Path, what: str = "output folder") -> None:
    """Refuse to write into a folder that already has files in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{what} {str(path)!r} is an existing file, not a folder; choose "
                              "a new path")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{what} {str(path)!r} exists and is not empty; choose a new path")


def save_params(path, config: LlamaConfig, params, tokenizer_dir: Path | None = None) -> Path:
    """Write `params` + the model config as a standalone Orbax checkpoint, atomically."""
    path = Path(path).absolute()
    ensure_empty_output(path, "checkpoint folder")
    tmp = atomic_dir(path)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        (tmp / MODEL_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
        (tmp / INTEGRITY).write_text(json.dumps(tree_integrity(params)))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        commit_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _step_dirs(root: Path) -> list[Path]:
    """Numbered step folders holding `params/`, newest first."""
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()
             and (p / "params").is_dir()]
    return sorted(steps, key=lambda p: int(p.name), reverse=True)


def resolve_checkpoint(path) -> Path:
    """The folder that holds `params/` for a checkpoint, manager or work dir path (the newest
    step; `load_params` falls back to older ones when it is unreadable)."""
    return checkpoint_candidates(path)[0]


def checkpoint_candidates(path) -> list[Path]:
    """Folders holding `params/` that `path` may mean, best first (newest step first)."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    for root in (path, path / "checkpoints"):
        if (root / "params").is_dir():
            return [root]
        if root.is_dir():
            steps = _step_dirs(root)
            if steps:
                return steps
    manager = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if manager.name == "checkpoints" and manager.is_dir():  # a work dir, or its manager folder
        raise FileNotFoundError(_no_step_yet(path, manager))
    raise FileNotFoundError(
        f"{str(path)!r} is not a soft_jax checkpoint: expected 'params/' and '{MODEL_CONFIG}', "
        "numbered step folders, or a work dir with 'checkpoints/'")


def _no_step_yet(path: Path, manager: Path) -> str:
    """Why `path`, a training work dir or its `manager` folder without step folders, has no
    checkpoint: none saved yet, or every step moved aside."""
    aside = sorted(p.name for p in manager.iterdir()
                   if p.is_dir() and p.name.split("-")[0] in ASIDE_LABELS)
    if aside:
        return (f"{str(path)!r} has no usable checkpoint: its steps were moved aside "
                f"({', '.join(aside[:3])})")
    return (f"{str(path)!r} is a work dir with no checkpoint yet: its run has not saved a step "
            "(see config.checkpoint_every)")


def read_model_config(ckpt: Path) -> LlamaConfig:
    """The model config stored beside a checkpoint's params (or in its manager's metadata)."""
    for candidate in (ckpt / MODEL_CONFIG, ckpt / "meta" / "metadata", ckpt.parent / MODEL_CONFIG,
                      ckpt.parent.parent / MODEL_CONFIG):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            return LlamaConfig.from_dict(data.get("model", data))
    raise FileNotFoundError(f"no {MODEL_CONFIG} found for checkpoint {str(ckpt)!r}")


def saved_integrity(ckpt: Path) -> dict | None:
    """The integrity record written with a checkpoint's params (None: there is none, so the
    checkpoint is unverified)."""
    meta = ckpt / "meta" / "metadata"
    if meta.is_file():
        return json.loads(meta.read_text()).get("params_integrity")
    if (ckpt / INTEGRITY).is_file():
        return json.loads((ckpt / INTEGRITY).read_text())
    return None


def default_shardings(tree, config: LlamaConfig):
    """Shardings for this process's devices: one device, or FSDP over all of them."""
    if jax.device_count() == 1:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: one, tree)
    from soft_jax.parallel import sharding as shd

    mesh = shd.build_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    return mesh_shardings(tree, config, mesh, shd.RULES)


def mesh_shardings(tree, config: LlamaConfig, mesh, rules):
    """Shardings of a params tree on `mesh` by the logical axes `config`'s params declare."""
    from soft_jax.model.transformer import param_axes
    from soft_jax.parallel import sharding as shd

    return shd.tree_shardings(tree, param_axes(config), mesh, rules or shd.RULES)


class _NoStepMetadataWarning(logging.Filter):
    """Drops Orbax's warning that an item folder (STEP/params) lacks the step's metadata
    file: the checkpoint manager keeps that file one level up, and the params read fine."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


def _restore_verified(ckpt: Path, shardings, mesh, rules, allow_nonfinite: bool,
                      allow_unverified: bool) -> dict:
    """Params of one checkpoint folder restored into an explicit target, then verified; one
    without an integrity record is refused (UnverifiedCheckpointError) before anything is
    read, unless `allow_unverified`."""
    record = saved_integrity(ckpt)
    if record is None and not allow_unverified:
        raise UnverifiedCheckpointError(UNVERIFIED)
    with (filtered(_NoStepMetadataWarning(), logging.getLogger("absl")),
          ocp.StandardCheckpointer() as ckptr):
        meta = ckptr.metadata(ckpt / "params")
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        if shardings is None and mesh is not None:
            shardings = mesh_shardings(tree, read_model_config(ckpt), mesh, rules)
        if shardings is None:
            shardings = default_shardings(tree, read_model_config(ckpt))
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                              tree, shardings)
        params = ckptr.restore(ckpt / "params", target)
    problem = integrity_problem(params, record, allow_nonfinite,
                                nonfinite_hint=" (allow_nonfinite / --allow-nonfinite to load "
                                               "anyway)")
    if problem:
        raise CheckpointError(problem)
    if record is None:
        warnings.warn(f"checkpoint {str(ckpt)!r} has {UNVERIFIED}; loaded unverified (only "
                      "checked for NaN / inf)", RuntimeWarning, stacklevel=3)
    return params


def load_params(path, shardings=None, *, mesh=None, rules=None, dtype=None,
                allow_nonfinite: bool = False,
                allow_unverified: bool = False) -> tuple[LlamaConfig, dict]:
    """(config, params) from any checkpoint layout, verified against the saved checksum.

    Params always restore into an explicit target: `shardings` (a tree matching the
    params), or `mesh` (and optionally `rules`, default `sharding.RULES`) sharding each leaf
    by its logical axes, or by default this process's devices (one device, or FSDP over
    all). Every process reads only its own shards, whatever mesh or process count wrote the
    checkpoint. `dtype` (e.g. "float32") casts after verification. When the newest step of a
    manager / work dir is unreadable, fails verification (including NaN / inf params, unless
    `allow_nonfinite`) or has no integrity record (unless `allow_unverified`), older steps
    are tried in turn, with a warning.
    """
    failures, unverified = [], False
    candidates = checkpoint_candidates(path)
    for i, ckpt in enumerate(candidates):
        try:
            params = _restore_verified(ckpt, shardings, mesh, rules, allow_nonfinite,
                                       allow_unverified)
        except Exception as e:  # noqa: BLE001  any unreadable step: try the previous one
            unverified |= isinstance(e, UnverifiedCheckpointError)
            failures.append(f"{ckpt.name}: {one_line(e)}")
            if i + 1 < len(candidates):
                warnings.warn(f"checkpoint {str(ckpt)!r} is unusable ({one_line(e)}); trying "
                              f"{candidates[i + 1].name}", RuntimeWarning, stacklevel=2)
            continue
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, params)
        return read_model_config(ckpt), params
    raise CheckpointError(f"no usable checkpoint under {str(path)!r}: " + "; ".join(failures)
                          + (f" ({ALLOW_UNVERIFIED})" if unverified else ""))


def tokenizer_dir_of(path) -> Path | None:
    """Tokenizer files saved with a checkpoint (or beside its work dir), if any."""
    ckpt = resolve_checkpoint(path)
    for candidate in (ckpt / TOKENIZER_DIR, ckpt.parent / TOKENIZER_DIR,
                      ckpt.parent.parent / TOKENIZER_DIR):
        if candidate.is_dir():
            return candidate
    return None


@dataclasses.dataclass
class _KeepPinned:
    """An Orbax preservation policy that keeps one chosen step, however old (none: None)."""

    step: int | None = None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        """Whether each checkpoint is the pinned one."""
        return [c.step == self.step for c in checkpoints]


class TrainCheckpoints:
    """Orbax CheckpointManager for training: params, optimizer state and JSON metadata per step.

    Orbax writes each step into a temporary folder and renames it when complete, so a crash
    mid-save leaves the previous step as the latest restorable one. Rotation keeps the last
    `keep` steps and also the pinned one (`pin` / `confirm`: the last step known to be good),
    so steps saved while a run goes bad can never push out the one to go back to.
    """

    def __init__(self, directory: Path, keep: int = 2, async_save: bool = True):
        self._pinned = _KeepPinned()
        policy = checkpoint_managers.AnyPreservationPolicy(
            [checkpoint_managers.LatestN(keep), self._pinned])
        options = ocp.CheckpointManagerOptions(create=True, preservation_policy=policy,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Every step saved (or being saved), oldest first."""
        return sorted(self.manager.all_steps())

    @property
    def pinned(self) -> int | None:
        """The step that rotation keeps whatever its age (the last known good one)."""
        return self._pinned.step

    def pin(self, step: int | None) -> None:
        """Keep `step` through rotation (and let the previously pinned one go)."""
        self._pinned.step = step

    def confirm(self, upto: int) -> None:
        """Pin the newest saved step at or before `upto`: a later step's metrics showed it
        good."""
        good = [s for s in self.steps() if s <= upto]
        if good:
            self.pin(max(good))

    def save(self, step: int, params, opt_state, meta: dict, force: bool = False) -> None:
        """Start saving (async where enabled); `force` saves even off the usual interval.

        Params or optimizer state with NaN / inf are refused (NonFiniteParamsError) before
        anything is written, so keep-last-N rotation only ever replaces good checkpoints with
        good ones; both trees' integrity records go into the step's metadata."""
        for what, tree in zip(TRAIN_TREES, (params, opt_state)):
            record = tree_integrity(tree)
            if not record["finite"]:
                raise NonFiniteParamsError(
                    f"{what} at step {step} hold NaN or inf; not saved (the last saved step, "
                    f"{self.latest_step()}, is kept)")
            meta = {**meta, f"{what}_integrity": record}
        meta["recorded"] = list(TRAIN_TREES)
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

    def restore_verified(self, step: int, abstract_params, abstract_opt_state):
        """`restore`, then both trees checked against the integrity records saved with them;
        a step missing a record it says it wrote raises UnverifiedCheckpointError, a mismatch
        CheckpointError. The optimizer state of a step older than its checksum is checked for
        NaN / inf only, with a warning."""
        params, opt_state, meta = self.restore(step, abstract_params, abstract_opt_state)
        recorded = meta.get("recorded", LEGACY_RECORDED)
        for what, tree in zip(TRAIN_TREES, (params, opt_state)):
            record = meta.get(f"{what}_integrity")
            if record is None and what in recorded:
                raise UnverifiedCheckpointError(f"{what}: {UNVERIFIED}")
            problem = integrity_problem(tree, record, what=what)
            if problem:
                raise CheckpointError(problem)
            if record is None:
                warnings.warn(f"checkpoint step {step} predates {what} checksums (written by an "
                              f"older soft_jax): its {what} is checked for NaN / inf only",
                              RuntimeWarning, stacklevel=3)
        return params, opt_state, meta

    def restore_latest(self, abstract_params, abstract_opt_state):
        """(step, params, opt_state, meta) of the newest step that reads and verifies.

        Each newer step that fails (or has no integrity record) is reported with a warning and,
        once an older step has verified, moved aside to `corrupt-STEP-*` (`unverified-STEP-*`),
        kept for inspection out of the manager's sight. When no step verifies nothing is moved.
        """
        failures = []
        for step in reversed(self.steps()):
            try:
                restored = self.restore_verified(step, abstract_params, abstract_opt_state)
            except Exception as e:  # noqa: BLE001  any unreadable step: try the previous one
                failures.append((step, e))
                warnings.warn(f"checkpoint step {step} in {self.manager.directory} is unusable "
                              f"({one_line(e)}); trying the previous step", RuntimeWarning,
                              stacklevel=2)
                continue
            for bad, e in failures:
                self.quarantine(bad, "unverified" if isinstance(e, UnverifiedCheckpointError)
                                else "corrupt")
            return (step, *restored)
        raise CheckpointError(f"no usable checkpoint in {self.manager.directory}: "
                              + "; ".join(f"step {s}: {one_line(e)}" for s, e in failures))

    def quarantine(self, step: int, label: str) -> Path:
        """Move step folder `step` aside to `LABEL-STEP-xxxxxx` (out of the manager's sight,
        kept for inspection); every process calls this, process 0 moves."""
        from soft_jax.parallel import distributed

        root = Path(self.manager.directory)
        aside = root / f"{label}-{step}-{uuid.uuid4().hex[:6]}"
        distributed.barrier(f"soft_jax:quarantine-{step}")
        if jax.process_index() == 0 and (root / str(step)).exists():
            os.replace(root / str(step), aside)
            log(f"moved checkpoint step {step} aside to {aside.name}")
        distributed.barrier(f"soft_jax:quarantined-{step}")
        self.manager.reload()
        return aside

    def wait(self) -> None:
        """Block until any async save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
