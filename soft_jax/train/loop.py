"""The training loop: SoFT (all exits), SFT (last layer), ICT (per-exit heads on a frozen SFT
model) and SortedNet (one random exit per step). `train(cfg)` runs or resumes a job; its
command is `soft-jax train --config configs/tiny.py [--config.total_steps=100 ...]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from soft_jax.data import formats as data_lib
from soft_jax.parallel import distributed
from soft_jax.parallel import sharding as shd
from soft_jax.io.checkpoint import (MODEL_CONFIG, TOKENIZER_DIR, NonFiniteParamsError,
                                 TrainCheckpoints)
from soft_jax.model.config import LlamaConfig, preset
from soft_jax.model.exits import initial_exit_heads
from soft_jax.model.layer_counts import pair_exit_weights
from soft_jax.io.loading import load_model
from soft_jax.train.guard import Divergence, DivergenceGuard, GuardSettings
from soft_jax.train.heldout import per_exit_metrics
from soft_jax.train.run_log import RunWriter, Throughput, format_metrics
from soft_jax.utils.log import log
from soft_jax.model.transformer import init_params, param_axes
from soft_jax.data.tokenizer import load_tokenizer
from soft_jax.train.run_config import resume_changes, validate, with_defaults
from soft_jax.train.modes import exit_heads_for, train_exits, trainable_keys
from soft_jax.train.step import (Partitioning, StepSettings, TrainState, abstract_state,
                                  make_partitioning, make_train_step, sharded_target)
from soft_jax.train.workdir_lock import WorkdirLock, WorkdirLocked
from soft_jax.train.workdir_lock import acquire as acquire_lock

TRAIN_CONFIG = "train_config.json"
TRUNCATION_WARN = 0.1  # warn when more than this share of the rows is truncated


class TrainingDiverged(RuntimeError):
    """The run diverged (NaN / inf, a dead model, a loss that stays spiked) and stops (exit 3)
    without saving that state."""


class Diverged(TrainingDiverged):
    """The guard's verdict on one step, before the run decides to retry or to stop."""

    def __init__(self, divergence: Divergence):
        super().__init__(divergence.reason)
        self.divergence = divergence


# ------------------------------------------------------------------------ data
def build_data(cfg, workdir: Path):
    """(tokenizer, train BatchStream, eval batches, stats) for a run; the tokenizer is saved."""
    rows = data_lib.load_rows(cfg.data.source, cfg.data.split, cfg.data.subset or None)
    if cfg.data.max_rows:
        rows = rows[:cfg.data.max_rows]
    tok_dir = workdir / TOKENIZER_DIR
    existed = tok_dir.is_dir()
    distributed.barrier("soft_jax:tokenizer-checked")  # all look before process 0 writes
    if existed:
        tokenizer = load_tokenizer(str(tok_dir))
    else:
        spec = cfg.data.tokenizer or cfg.model.init_from
        if not spec:
            raise ValueError("config.data.tokenizer is empty and config.model.init_from has no "
                             "tokenizer to fall back on")
        if distributed.is_primary():
            texts = (t for i, r in enumerate(rows)
                     for t, _ in _safe_segments(cfg.data.format, r, i))
            tokenizer = load_tokenizer(spec, texts)
            tokenizer.save_pretrained(tok_dir)
        distributed.barrier("soft_jax:tokenizer-saved")
        if not distributed.is_primary():  # every process tokenises with the very same files
            tokenizer = load_tokenizer(str(tok_dir))
    stats = data_lib.DataStats()
    template = data_lib.resolve_template(cfg.data.template, tokenizer, cfg.data.format)
    examples = data_lib.tokenize_rows(rows, cfg.data.format, tokenizer, cfg.data.seq_len,
                                      cfg.data.on_bad_row, stats, template)
    check_targets(stats, cfg.data.seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = data_lib.BatchStream(examples, cfg.data.seq_len, cfg.batch_size, cfg.seed,
                                  pack=cfg.data.pack, pad_id=pad)
    eval_batches = []
    if cfg.data.eval_source:
        eval_rows = data_lib.load_rows(cfg.data.eval_source, cfg.data.eval_split,
                                       cfg.data.subset or None)
        ev = data_lib.tokenize_rows(eval_rows, cfg.data.format, tokenizer, cfg.data.seq_len,
                                    cfg.data.on_bad_row, template=template)
        es = data_lib.BatchStream(ev, cfg.data.seq_len, cfg.batch_size, 0, pack=cfg.data.pack,
                                  shuffle=False, pad_id=pad)
        n = min(cfg.eval_batches, max(1, es.rows_per_epoch // cfg.batch_size))
        eval_batches = [es.batch(k) for k in range(n)]
    return tokenizer, stream, eval_batches, stats


def check_targets(stats: data_lib.DataStats, seq_len: int) -> None:
    """Error when truncation left nothing to learn; warn when it cut many rows."""
    if stats.rows and stats.target_tokens == 0:
        raise data_lib.DataError(
            f"no target tokens: all {stats.rows} rows lose their targets when truncated to "
            f"data.seq_len={seq_len} ({stats.truncated} truncated); raise config.data.seq_len")
    if stats.rows and stats.truncated > TRUNCATION_WARN * stats.rows:
        log(f"warning: {stats.truncated} of {stats.rows} rows "
            f"({100 * stats.truncated / stats.rows:.0f}%) are truncated to data.seq_len="
            f"{seq_len} tokens, {stats.no_targets} of them left with no target; consider a "
            "larger config.data.seq_len")


def check_sources(cfg) -> None:
    """Fail fast on a local path that does not exist (before any hub lookup or data work)."""
    for name, spec, bare in (("data.eval_source", cfg.data.eval_source, False),
                             ("model.init_from", cfg.model.init_from, True),
                             ("data.tokenizer", cfg.data.tokenizer, True)):
        spec = spec.split(":", 1)[1] if spec.startswith("gguf:") else spec
        if (spec and not spec.startswith(("gsm8k_demo:", "bpe:")) and not Path(spec).exists()
                and (cfg.data.tokenizer.startswith("gguf:") and name == "data.tokenizer"
                     or not data_lib.is_hub_id(spec, allow_bare=bare))):
            raise FileNotFoundError(f"config.{name}={spec!r} does not exist (a local path) and "
                                    "is not a hub name")


def check_resume(cfg, workdir: Path, step: int) -> bool:
    """Stop when resuming `workdir` with a config that changes what is trained; log a grown
    total_steps. True when the run continues (its config is then to be recorded)."""
    saved_path = workdir / TRAIN_CONFIG
    if not saved_path.is_file():
        return False
    saved = json.loads(saved_path.read_text())
    changed = resume_changes(saved, json.loads(cfg.to_json_best_effort()))
    if changed:
        raise ValueError(
            f"work dir {str(workdir)!r} holds a run at step {step} trained with a different "
            "config: " + "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in changed)
            + " (use a new config.workdir for a different run)")
    if saved.get("total_steps") != cfg.total_steps and step < cfg.total_steps:
        log(f"total_steps {saved.get('total_steps')} -> {cfg.total_steps}: continuing from "
            f"step {step} (the lr schedule now spans {cfg.total_steps} steps)")
    if step >= cfg.total_steps:
        log(f"work dir {str(workdir)!r} is already at step {step} >= total_steps="
            f"{cfg.total_steps}: nothing to train (raise --config.total_steps to continue)")
    return step < cfg.total_steps


def _safe_segments(fmt, row, idx):
    try:
        return data_lib.FORMATS[fmt](row, idx)
    except data_lib.DataError:
        return []


# ------------------------------------------------------------------------ model
def preset_config(cfg, vocab_size: int, **fields) -> LlamaConfig:
    """The random-init model `cfg.model.preset` with `cfg.model.overrides` (vocab_size 0: the
    tokenizer's); the preset's own exits deeper than an overridden num_layers are dropped
    (`build_model` then applies the run's config.exits)."""
    overrides = {k: v for k, v in cfg.model.overrides.items() if v or k != "vocab_size"}
    overrides.setdefault("vocab_size", vocab_size)
    base = preset(cfg.model.preset)
    if "exits" not in overrides and base.exits is not None:
        depth = int(overrides.get("num_layers", base.num_layers))
        overrides["exits"] = tuple(e for e in base.exits if e <= depth)
    return preset(cfg.model.preset, **overrides, **fields)


def random_params(config: LlamaConfig, seed: int, mesh=None, rules=shd.RULES) -> dict:
    """`init_params` compiled as one program; with a `mesh`, straight into the shards of the
    logical-axis rules (a 13B model never sits whole on one device)."""
    init = lambda key: init_params(config, key)  # noqa: E731
    key = jax.random.PRNGKey(seed)
    if mesh is None:
        return jax.jit(init)(key)
    shardings = shd.tree_shardings(jax.eval_shape(init, key), param_axes(config), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(key)


def model_fields(cfg) -> dict:
    """The LlamaConfig fields a run sets whatever the model's source: dtypes, remat."""
    return dict(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
                remat_policy=cfg.model.remat_policy)


def run_model_config(cfg, config: LlamaConfig, vocab_size: int) -> LlamaConfig:
    """A model shape (a preset's or a loaded model's) as the run trains it: the run's exits
    and exit weights, dtypes, remat policy and ICT exit heads; checks the tokenizer fits."""
    try:
        exits, weights = pair_exit_weights(tuple(cfg.exits) or config.exits,
                                           tuple(cfg.exit_weights) or None, config.num_layers,
                                           "config.exits", "config.exit_weights")
    except ValueError as e:
        raise ValueError(f"{e} (config.exits={tuple(cfg.exits)} on a model of "
                         f"{config.num_layers} layers)") from None
    config = config.replace(exits=exits, exit_weights=weights, **model_fields(cfg),
                            num_exit_heads=exit_heads_for(cfg.mode, exits))
    if vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size} (config.model / config.data.tokenizer)")
    return config


def build_model(cfg, vocab_size: int, mesh=None, rules=shd.RULES) -> tuple[LlamaConfig, dict]:
    """Model config and initial params: random from a preset, a HF model, or a checkpoint.

    With a `mesh`, the params come back sharded by the logical-axis rules: random init runs
    under jit straight into its shards, checkpoints restore shard by shard, and HF weights are
    cut into shards on the host.
    """
    src = cfg.model.init_from
    params = None
    if not src:
        config = preset_config(cfg, vocab_size, **model_fields(cfg))
    else:  # a checkpoint (restored shard by shard), HF folder or hub name, in the param dtype
        config, params, _, _ = load_model(src, cfg.model.param_dtype, mesh=mesh, rules=rules,
                                          tokenizer=False)
    config = run_model_config(cfg, config, vocab_size)
    if params is None:
        params = random_params(config, cfg.seed, mesh, rules)
    if cfg.mode == "ict" and "exit_heads" not in params:
        params = {**params, "exit_heads": initial_exit_heads(config, params)}
    if mesh is not None:
        params = shd.place(params, shd.tree_shardings(params, param_axes(config), mesh, rules))
    return config, params


# ------------------------------------------------------------------------ optimizer/step
def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up + cosine decay, global-norm clipping, no decay on norms.

    The schedule is read one step ahead, so step 0 already has lr / warmup_steps (a warm-up
    from 0 would make the first update a no-op) and the last step ends at the minimum.
    """
    o = cfg.optimizer
    ramp = optax.warmup_cosine_decay_schedule(
        0.0, o.lr, max(1, o.warmup_steps), max(o.warmup_steps + 1, cfg.total_steps),
        end_value=o.lr * o.min_lr_ratio)
    schedule = lambda step: ramp(step + 1)  # noqa: E731
    decay_mask = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: not any("norm" in str(k) for k in path), p)
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask))
    return tx, schedule


# ------------------------------------------------------------------------ setup
@dataclasses.dataclass
class Run:
    """A run ready to step: what `setup` built and `run_loop` advances, saves and evaluates."""

    cfg: Any
    workdir: Path
    writer: RunWriter
    ckpts: TrainCheckpoints
    config: LlamaConfig
    part: Partitioning
    state: TrainState
    step_fn: Callable
    stream: data_lib.BatchStream
    eval_batches: list
    stats: data_lib.DataStats
    batch_rows: list  # this process's [lo, hi) rows of every global batch
    start_step: int  # the step the run starts (or resumes) at
    target: TrainState  # abstract, sharded: what a checkpoint restores into
    guard: DivergenceGuard
    lock: WorkdirLock | None = None  # process 0's lock on the work dir
    batch_offset: int = 0  # batches skipped after divergences: step k trains on k + offset
    retries_used: int = 0  # divergences recovered from by restoring and skipping

    def watch(self, step: int, metrics) -> None:
        """Show the guard `step`'s loss and gradient norm (waiting for them): Diverged when
        the run has; once healthy, the newest checkpoint before `step` is pinned as good."""
        m = {k: float(v) for k, v in jax.device_get(
            {k: metrics[k] for k in ("loss", "grad_norm", "num_tokens")}).items()}
        divergence = self.guard.observe(step, m["loss"], m["grad_norm"], m["num_tokens"])
        if divergence is not None:
            raise Diverged(divergence)
        if self.guard.healthy:
            self.ckpts.confirm(step - 1)

    def save(self, step: int, metrics, force: bool = False) -> None:
        """Checkpoint the state after `step` steps (once the guard has seen this step)."""
        self.watch(step, metrics)
        meta = {"step": step, "seed": self.cfg.seed, "model": self.config.to_dict(),
                "data_position": self.stream.position(step + self.batch_offset),
                "batch_offset": self.batch_offset, "guard_retries": self.retries_used,
                "mode": self.cfg.mode}
        try:
            self.ckpts.save(step, self.state.params, self.state.opt_state, meta, force=force)
        except NonFiniteParamsError as e:
            raise Diverged(Divergence(step, step, str(e))) from None

    def recover(self, d: Divergence) -> int:
        """After divergence `d`: the checkpoints saved since the last good (pinned) one are
        moved aside as `diverged-STEP-*`; with retries left the run goes back to that one and
        skips the batches it trained on since (returns its step), else TrainingDiverged."""
        self.ckpts.wait()
        good = self.ckpts.pinned
        dead = [s for s in self.ckpts.steps() if good is None or s > good]
        for s in dead:
            self.ckpts.quarantine(s, "diverged")
        if good is None or self.retries_used >= self.cfg.guard.retries:
            raise TrainingDiverged(stop_message(d, good, dead, self.retries_used)) from None
        params, opt_state, _ = self.ckpts.restore_verified(good, self.target.params,
                                                           self.target.opt_state)
        self.state = TrainState(jax.device_put(jnp.asarray(good, jnp.int32),
                                               self.part.state.step), params, opt_state)
        skipped = (good + self.batch_offset, d.step + self.batch_offset)
        self.batch_offset += d.step - good
        self.retries_used += 1
        self.guard.rewind(good)
        log(f"{d.reason}; retry {self.retries_used}/{self.cfg.guard.retries}: back to "
            f"checkpoint {good}, skipping batches {skipped[0]}..{skipped[1] - 1}")
        return good

    def evaluate(self, step: int) -> dict:
        """Per-exit held-out metrics of the current params, logged and written."""
        results = per_exit_metrics(self.config, self.state.params, self.eval_batches)
        self.writer.eval(step, results)
        return results

    def summary(self, status: str, step: int, history: list, **extra) -> dict:
        """What `train` returns."""
        return {"status": status, "step": step, "workdir": str(self.workdir),
                "history": history, **extra, "mesh": shd.describe(self.part.mesh),
                "batch_rows": self.batch_rows}

    def close(self) -> None:
        """Finish pending saves, close the writers and release the work dir."""
        try:
            self.ckpts.close()
            self.writer.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def stop_message(d: Divergence, good: int | None, moved: list[int], retries: int) -> str:
    """The one line a diverged run stops with: what, when, and what is left to resume."""
    kept = (f"the last good checkpoint, step {good}, is kept as the latest" if good is not None
            else "no checkpoint was saved before it")
    aside = (f", the {len(moved)} saved since moved aside as diverged-STEP-*" if good is not None
             else f", the {len(moved)} saved moved aside as diverged-STEP-*") if moved else ""
    tried = f" (after {retries} retr{'y' if retries == 1 else 'ies'})" if retries else ""
    return (f"training diverged{tried}: {d.reason}; stopped without saving this state, "
            f"{kept}{aside} (lower config.optimizer.lr, check the data or set "
            "config.guard.retries)")


def run_mesh(cfg, devices=None) -> tuple[jax.sharding.Mesh, tuple]:
    """The run's device mesh (over `devices`, default all) and sharding rules; checks the
    batch splits over data x fsdp."""
    mesh = shd.build_mesh(cfg.mesh, devices)
    rules = shd.make_rules(cfg.mesh.rules)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % dp:
        raise ValueError(f"config.batch_size={cfg.batch_size} must be divisible by mesh "
                         f"data x fsdp = {dp} ({shd.describe(mesh)})")
    if (cfg.batch_size // cfg.grad_accum) % dp:
        log(f"warning: micro-batches of {cfg.batch_size // cfg.grad_accum} rows do not split "
            f"over data x fsdp = {dp}: each is replicated (every device computes every row); "
            "lower grad_accum or raise batch_size")
    return mesh, rules


class Start(NamedTuple):
    """Where a run starts: what `initial_state` built or restored."""

    config: LlamaConfig
    state: TrainState
    step_fn: Callable
    part: Partitioning
    step: int
    target: TrainState  # abstract and sharded, for restores
    meta: dict  # the restored checkpoint's metadata ({} for a fresh run)


def initial_state(cfg, writer: RunWriter, ckpts: TrainCheckpoints, resume_step: int | None,
                  vocab_size: int, mesh, rules) -> Start:
    """The start of a fresh model, or of the latest checkpoint restored straight into this
    mesh's shards (whatever mesh wrote it), which is then pinned as the last good one."""
    if resume_step is not None:
        config = LlamaConfig.from_dict(json.loads((writer.workdir / MODEL_CONFIG).read_text()))
        params = None
    else:
        config, params = build_model(cfg, vocab_size, mesh, rules)
        writer.write_text(MODEL_CONFIG, json.dumps(config.to_dict(), indent=2))
        writer.write_text(TRAIN_CONFIG, cfg.to_json_best_effort(indent=2))
    built = build_step(cfg, config, mesh, rules, params)
    part = built.part
    target = sharded_target(built.abstract, part)
    meta = {}
    if resume_step is not None:
        resume_step, params, opt_state, meta = ckpts.restore_latest(target.params,
                                                                    target.opt_state)
        ckpts.pin(resume_step)
        log(f"resumed from step {resume_step} ({meta.get('data_position')})")
    else:
        opt_state = jax.jit(built.tx.init, out_shardings=part.state.opt_state)(
            {k: params[k] for k in built.keys})
    step = jax.device_put(jnp.asarray(resume_step or 0, jnp.int32), part.state.step)
    return Start(config, TrainState(step, params, opt_state), built.step_fn, part,
                 int(resume_step or 0), target, meta)


def _make_workdir(cfg) -> Path:
    """The run's work dir (created when absent); a file in its way or a folder that cannot
    be written is a ValueError naming config.workdir."""
    workdir = Path(cfg.workdir).absolute()
    blocker = next((p for p in (workdir, *workdir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"config.workdir={cfg.workdir!r}: {str(blocker)!r} is a file, not a "
                         "folder")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _not_writable(cfg, e) from None
    return workdir


def _not_writable(cfg, e: OSError) -> ValueError:
    return ValueError(f"config.workdir={cfg.workdir!r} cannot be written ({e.strerror}: "
                      f"{e.filename}); training writes its checkpoints and logs there")


def lock_workdir(cfg, workdir: Path) -> WorkdirLock | None:
    """This job's lock on `workdir`, held by process 0 (the other processes of the job share
    it); when it is taken or cannot be written, every process raises before touching it."""
    lock, error = None, None
    if distributed.is_primary():
        try:
            lock = acquire_lock(workdir)
        except WorkdirLocked as e:
            error = e
        except OSError as e:
            error = _not_writable(cfg, e)
    if not distributed.primary_says(error is None):
        raise error or WorkdirLocked(f"work dir {str(workdir)!r} is locked or unwritable (see "
                                     "process 0's error)")
    return lock


class StepBuild(NamedTuple):
    """What a run steps with: optimizer, trainable groups, abstract state, layout, jitted step."""

    tx: optax.GradientTransformation
    keys: tuple[str, ...]
    abstract: TrainState  # of ShapeDtypeStructs
    part: Partitioning
    step_fn: Callable


def build_step(cfg, config: LlamaConfig, mesh, rules, params=None,
               backend: str | None = None) -> StepBuild:
    """The optimizer, abstract state, shardings and jitted train step of run `cfg` for the
    model `config` on `mesh`: what `initial_state` trains with and `soft-jax compile`
    compiles. `params` (arrays or shapes) default to the model's init shapes; `backend`
    names the target whose defaults (the loss chunk) apply when it is not this host's."""
    tx, schedule = make_optimizer(cfg)
    if params is None:
        params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    keys = trainable_keys(params, cfg.mode)
    abstract = abstract_state(config, tx, keys, params)
    part = make_partitioning(mesh, rules, abstract, cfg.batch_size, cfg.data.seq_len,
                             param_axes(config))
    step_fn = make_train_step(config, StepSettings.from_config(cfg, backend), tx, schedule,
                              keys, part)
    return StepBuild(tx, keys, abstract, part, step_fn)


def abstract_batch(cfg, part: Partitioning) -> dict:
    """One global batch as shapes: the keys and dtypes the data pipeline feeds the step,
    with the batch sharding."""
    empty = data_lib.pack_examples([], cfg.data.seq_len, pack=cfg.data.pack)
    shape = (cfg.batch_size, cfg.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, v.dtype, sharding=part.batch)
            for k, v in empty.items()}


def setup(cfg) -> Run:
    """Validate `cfg`, start the runtime, lock the work dir, build data, model, state and step
    (or resume the work dir's latest checkpoint) and record the run's configs."""
    cfg = with_defaults(cfg)
    validate(cfg)
    distributed.initialize(cfg.distributed)  # before anything touches a jax backend
    mesh, rules = run_mesh(cfg)
    workdir = _make_workdir(cfg)
    with contextlib.ExitStack() as undo:  # on an error, close what was opened, newest first
        lock = lock_workdir(cfg, workdir)  # before anything in the work dir is read or written
        if lock is not None:
            undo.callback(lock.release)
        ckpts = TrainCheckpoints(workdir / "checkpoints", cfg.keep_checkpoints,
                                 cfg.async_checkpointing)
        undo.callback(ckpts.close)
        writer = RunWriter(workdir)
        resume_step = ckpts.latest_step()
        check_sources(cfg)  # the checks come before any data or model work
        if resume_step is not None and check_resume(cfg, workdir, resume_step):
            writer.write_text(TRAIN_CONFIG, cfg.to_json_best_effort(indent=2))
        tokenizer, stream, eval_batches, stats = build_data(cfg, workdir)
        log(f"data: {stats.rows} rows, {stats.skipped} skipped, {stats.truncated} truncated to "
            f"{cfg.data.seq_len} tokens ({stats.no_targets} of them left with no target), "
            f"{stats.target_tokens} target tokens, {stream.rows_per_epoch} rows/epoch "
            f"({'packed' if cfg.data.pack else 'padded'})")
        start = initial_state(cfg, writer, ckpts, resume_step, len(tokenizer), mesh, rules)
        undo.pop_all()  # the Run owns the lock and the checkpoints from here on
    rows = shd.process_rows(start.part.batch, cfg.batch_size)
    log(f"mesh {shd.describe(mesh)} over {jax.device_count()} devices in "
        f"{jax.process_count()} process(es); process 0 feeds batch rows {rows}")
    if jax.process_count() > 1 and eval_batches:  # global (replicated) arrays for eval
        eval_batches = [shd.place(b, jax.tree.map(lambda _: start.part.replicated, b))
                        for b in eval_batches]
    return Run(cfg, workdir, writer, ckpts, start.config, start.part, start.state,
               start.step_fn, stream, eval_batches, stats, rows, start.step, start.target,
               DivergenceGuard(GuardSettings.from_config(cfg.guard)), lock,
               start.meta.get("batch_offset", 0), start.meta.get("guard_retries", 0))


# ------------------------------------------------------------------------ loop
class _StopFlag:
    """Set by SIGTERM/SIGINT: finish the step, checkpoint, exit 0."""

    def __init__(self):
        self.signum = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def global_batch(run: Run, k: int) -> dict:
    """Global batch k of the run's stream, as this process's rows of one jax.Array each."""
    full = run.stream.batch(k + run.batch_offset)  # host numpy; every process packs it all
    return shd.global_batch(lambda lo, hi: {key: v[lo:hi] for key, v in full.items()},
                            run.part.batch, run.cfg.batch_size)


def _log_eval_save(run: Run, step: int, metrics, stop: _StopFlag,
                   throughput: Throughput) -> bool:
    """What follows step `step` on the config's intervals: the progress line, held-out eval
    and the checkpoint; True when it saved (the guard has then seen this step)."""
    cfg = run.cfg
    throughput.tick()
    if jax.process_count() > 1:  # a signal on any host stops every host at this step
        stop.signum = _agree_on_signal(stop.signum)
    if step % cfg.log_every == 0 or step == cfg.total_steps or stop.signum:
        m = throughput.record(step, metrics, run.stream.epochs_at(step + run.batch_offset))
        log(format_metrics(step, cfg.total_steps, m, train_exits(run.config, cfg.mode)))
        run.writer.metrics(step, m)
    if cfg.eval_every and step % cfg.eval_every == 0 and run.eval_batches:
        run.evaluate(step)
    if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
        run.save(step, metrics)
        return True
    return False


def run_loop(run: Run, on_step=None) -> dict:
    """Step `run` to config.total_steps (or a signal), logging, evaluating and
    checkpointing on the config's intervals, with every step shown to the divergence guard;
    closes the run and returns its summary."""
    cfg = run.cfg
    step = run.start_step
    stop = _StopFlag()
    throughput = Throughput(cfg.batch_size * cfg.data.seq_len)
    pending = None  # (step, metrics) the guard has not seen yet
    try:
        while step < cfg.total_steps:
            try:
                run.state, metrics = run.step_fn(run.state, global_batch(run, step))
                if pending is not None:  # one step behind: the host never waits on the device
                    run.watch(*pending)
                step += 1
                pending = (step, metrics)
                if on_step is not None:
                    on_step(step)
                if _log_eval_save(run, step, metrics, stop, throughput):
                    pending = None
                if stop.signum:
                    if pending is not None:
                        run.save(step, metrics, force=True)
                    run.ckpts.wait()
                    log(f"signal {stop.signum}: checkpointed step {step}; rerun the same "
                        "command to resume")
                    return run.summary("interrupted", step, throughput.history)
            except Diverged as d:
                step, pending = run.recover(d.divergence), None
        run.ckpts.wait()
        results = run.evaluate(step) if run.eval_batches else {}
    finally:
        stop.restore()
        run.close()
    return run.summary("done", step, throughput.history, eval=results, config=run.config,
                       params=run.state.params, data_stats=run.stats)


def train(cfg, on_step=None) -> dict:
    """Run (or resume) a training job described by `cfg`; returns a summary dict.

    `on_step(step)` is called after every step (hooks for tests and custom logging).

    Multi-process: every process runs this same function (see soft_jax/distributed.py for how
    the runtime is found); each builds only its own rows of every global batch, all of them
    write and read the checkpoints, process 0 alone logs and writes the metrics files.
    """
    return run_loop(setup(cfg), on_step)


def _agree_on_signal(signum):
    """The first signal number any process got (0 / None when none did)."""
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.asarray(signum or 0, np.int32))
    nz = [int(x) for x in np.ravel(got) if x]
    return nz[0] if nz else None
