"""Fine-tuning entrypoint: SoFT (all exits), SFT (last layer), ICT (per-exit heads on a frozen
SFT model) and SortedNet (one random exit per step).

    python -m soft_jax.train --config configs/tiny.py [--config.total_steps=100 ...]
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from soft_jax import data as data_lib
from soft_jax import distributed
from soft_jax import sharding as shd
from soft_jax.checkpoint import (MODEL_CONFIG, TOKENIZER_DIR, NonFiniteParamsError,
                                 TrainCheckpoints)
from soft_jax.config import LlamaConfig, pair_exit_weights, preset
from soft_jax.loading import load_model
from soft_jax.loss import loss_fn
from soft_jax.metrics import per_exit_metrics
from soft_jax.model import init_params
from soft_jax.tokenizer import load_tokenizer
from soft_jax.train_config import (exit_heads_for, resume_changes, train_exits,
                                   trainable_keys, validate)

TRAIN_CONFIG = "train_config.json"
TRUNCATION_WARN = 0.1  # warn when more than this share of the rows is truncated


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or params: the run stops without saving that state."""


def log(msg: str) -> None:
    """Progress line from process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)


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
        if jax.process_index() == 0:
            texts = (t for i, r in enumerate(rows)
                     for t, _ in _safe_segments(cfg.data.format, r, i))
            tokenizer = load_tokenizer(spec, texts)
            tokenizer.save_pretrained(tok_dir)
        distributed.barrier("soft_jax:tokenizer-saved")
        if jax.process_index() != 0:  # every process tokenises with the very same files
            tokenizer = load_tokenizer(str(tok_dir))
    stats = data_lib.DataStats()
    examples = data_lib.tokenize_rows(rows, cfg.data.format, tokenizer, cfg.data.seq_len,
                                      cfg.data.on_bad_row, stats)
    check_targets(stats, cfg.data.seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = data_lib.BatchStream(examples, cfg.data.seq_len, cfg.batch_size, cfg.seed,
                                  pack=cfg.data.pack, pad_id=pad)
    eval_batches = []
    if cfg.data.eval_source:
        eval_rows = data_lib.load_rows(cfg.data.eval_source, cfg.data.eval_split,
                                       cfg.data.subset or None)
        ev = data_lib.tokenize_rows(eval_rows, cfg.data.format, tokenizer, cfg.data.seq_len,
                                    cfg.data.on_bad_row)
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


def check_resume(cfg, workdir: Path, step: int) -> None:
    """Stop when resuming `workdir` with a config that changes what is trained; log a grown
    total_steps and record the config the run continues with."""
    saved_path = workdir / TRAIN_CONFIG
    if not saved_path.is_file():
        return
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
    elif jax.process_index() == 0:
        saved_path.write_text(cfg.to_json_best_effort(indent=2))


def check_finite(step: int, metrics) -> None:
    """Raise TrainingDiverged when the loss or gradient norm of `step` is NaN / inf."""
    m = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")})
    bad = {k: float(v) for k, v in m.items() if not np.isfinite(v)}
    if bad:
        raise TrainingDiverged(
            f"non-finite {' and '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; "
            "stopped without saving this state (lower config.optimizer.lr or check the data)")


def _safe_segments(fmt, row, idx):
    try:
        return data_lib.FORMATS[fmt](row, idx)
    except data_lib.DataError:
        return []


# ------------------------------------------------------------------------ model
def build_model(cfg, vocab_size: int, mesh=None, rules=shd.RULES) -> tuple[LlamaConfig, dict]:
    """Model config and initial params: random from a preset, a HF model, or a checkpoint.

    With a `mesh`, the params come back sharded by the logical-axis rules: random init runs
    under jit straight into its shards (a 13B model never sits whole on one device),
    checkpoints restore shard by shard, and HF weights are cut into shards on the host.
    """
    model_fields = dict(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
                        remat_policy=cfg.model.remat_policy)
    src = cfg.model.init_from
    if not src:
        overrides = {k: v for k, v in cfg.model.overrides.items() if v or k != "vocab_size"}
        overrides.setdefault("vocab_size", vocab_size)
        config = preset(cfg.model.preset, **overrides, **model_fields)
        params = None
    else:  # a checkpoint (restored shard by shard), HF folder or hub name, in the param dtype
        config, params, _, _ = load_model(src, cfg.model.param_dtype, mesh=mesh, rules=rules,
                                          tokenizer=False)
    exits, weights = pair_exit_weights(tuple(cfg.exits) or config.exits,
                                       tuple(cfg.exit_weights) or None, config.num_layers,
                                       "config.exits", "config.exit_weights")
    config = config.replace(exits=exits, exit_weights=weights, **model_fields,
                            num_exit_heads=exit_heads_for(cfg.mode, exits))
    if vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size} (config.model / config.data.tokenizer)")
    if params is None and mesh is not None and mesh.size > 1:
        init = lambda key: init_params(config, key)  # noqa: E731
        key = jax.random.PRNGKey(cfg.seed)
        shardings = shd.tree_shardings(jax.eval_shape(init, key), mesh, rules)
        params = jax.jit(init, out_shardings=shardings)(key)
    elif params is None:
        params = init_params(config, jax.random.PRNGKey(cfg.seed))
    if cfg.mode == "ict" and "exit_heads" not in params:
        from soft_jax.model import head_kernel

        shared = head_kernel(config.replace(num_exit_heads=0), params, config.num_layers)
        params = {**params, "exit_heads": {"kernel": jnp.stack([shared] * (len(exits) - 1))}}
    if mesh is not None:
        params = shd.place(params, shd.tree_shardings(params, mesh, rules))
    return config, params


# ------------------------------------------------------------------------ optimizer/step
def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up + cosine decay, global-norm clipping, no decay on norms."""
    o = cfg.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.lr, max(1, o.warmup_steps), max(o.warmup_steps + 1, cfg.total_steps),
        end_value=o.lr * o.min_lr_ratio)
    decay_mask = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: not any("norm" in str(k) for k in path), p)
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask))
    return tx, schedule


class Partitioning(NamedTuple):
    """How a run is laid out on its mesh: state and batch shardings, activation rules."""

    mesh: jax.sharding.Mesh
    rules: tuple
    state: dict  # {'step', 'params', 'opt_state'} -> NamedSharding trees
    batch: jax.sharding.NamedSharding  # every [batch, seq] input

    @property
    def replicated(self):
        return shd.replicated(self.mesh)


def abstract_state(config: LlamaConfig, tx, keys: tuple[str, ...], params=None) -> dict:
    """ShapeDtypeStructs of the train state (no device memory touched)."""
    if params is None:
        params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    opt = jax.eval_shape(tx.init, {k: params[k] for k in keys})
    return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt}


def make_partitioning(mesh, rules, state_abstract: dict, batch_size: int,
                      seq_len: int) -> Partitioning:
    """Shardings from the logical-axis rules: params and optimizer moments alike (FSDP over
    `fsdp`, tensor parallel over `tensor`, replicated over `data`), scalars replicated."""
    state = {"step": shd.replicated(mesh),
             "params": shd.tree_shardings(state_abstract["params"], mesh, rules),
             "opt_state": shd.tree_shardings(state_abstract["opt_state"], mesh, rules)}
    return Partitioning(mesh, tuple(rules), state,
                        shd.batch_sharding(mesh, batch_size, seq_len, rules))


def make_train_step(config: LlamaConfig, cfg, tx, schedule, keys: tuple[str, ...],
                    partitioning: Partitioning | None = None):
    """The jitted step(state, batch) -> (state, metrics); state is donated.

    With `partitioning`, the step is jitted with its state / batch in- and out-shardings and
    traced under the activation rules (the residual stream is pinned to batch x data/fsdp);
    without, it is a plain single-device jit.
    """
    exits = train_exits(config, cfg.mode)
    accum = int(cfg.grad_accum)
    mesh = partitioning.mesh if partitioning is not None else None
    rules = partitioning.rules if partitioning is not None else shd.RULES

    def loss_of(trainable, frozen, batch, rng):
        weights = None
        if cfg.mode == "sortednet":  # one sub-model per step, drawn uniformly
            idx = jax.random.randint(rng, (), 0, len(exits))
            weights = jax.nn.one_hot(idx, len(exits))
        loss, metrics = loss_fn(config, {**frozen, **trainable}, batch, exits,
                                z_loss=cfg.loss.z_loss, impl=cfg.loss.impl,
                                chunk_tokens=cfg.loss.chunk_tokens or None, weights=weights)
        if weights is not None:
            metrics = {**metrics, "sampled_exit": jnp.asarray(exits)[idx]}
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(state, batch):
        params = state["params"]
        trainable = {k: params[k] for k in keys}
        frozen = {k: v for k, v in params.items() if k not in keys}
        rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state["step"])
        if accum == 1:
            (_, metrics), grads = grad_fn(trainable, frozen, batch, rng)
        else:
            micro = jax.tree.map(lambda x: shd.constrain(
                x.reshape((accum, -1) + x.shape[1:]), (None,) + shd.BATCH_AXES), batch)

            def one(acc, mb):
                (_, m), g = grad_fn(trainable, frozen, mb, rng)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            zeros = jax.eval_shape(lambda: grad_fn(trainable, frozen,
                                                   jax.tree.map(lambda x: x[0], micro), rng))
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
            (grads, metrics), _ = jax.lax.scan(one, init, micro)
            grads = jax.tree.map(lambda g: g / accum, grads)
            metrics = jax.tree.map(lambda m: m / accum, metrics)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return {"step": state["step"] + 1, "params": {**frozen, **trainable},
                "opt_state": opt_state}, metrics

    if partitioning is None:
        return jax.jit(step, donate_argnums=0)

    def sharded_step(state, batch):
        with shd.activation_rules(mesh, rules):
            return step(state, batch)

    return jax.jit(sharded_step, donate_argnums=0,
                   in_shardings=(partitioning.state, partitioning.batch),
                   out_shardings=(partitioning.state, partitioning.replicated))


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


def _format_metrics(step, total, m, tok_s, exits) -> str:
    per_exit = " ".join(f"{e}:{m[f'loss/exit_{e}']:.3f}" for e in exits if f"loss/exit_{e}" in m)
    return (f"step {step}/{total} | loss {m['loss']:.4f} | exits {per_exit} | lr {m['lr']:.2e}"
            f" | gnorm {m['grad_norm']:.2f} | {tok_s:,.0f} tok/s")


def train(cfg, on_step=None) -> dict:
    """Run (or resume) a training job described by `cfg`; returns a summary dict.

    `on_step(step)` is called after every step (hooks for tests and custom logging).

    Multi-process: every process runs this same function (see soft_jax/distributed.py for how
    the runtime is found); each builds only its own rows of every global batch, all of them
    write and read the checkpoints, process 0 alone logs and writes the metrics files.
    """
    validate(cfg)
    distributed.initialize(cfg.distributed)  # before anything touches a jax backend
    mesh = shd.build_mesh(cfg.mesh)
    rules = shd.make_rules(cfg.mesh.rules)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % dp:
        raise ValueError(f"config.batch_size={cfg.batch_size} must be divisible by mesh "
                         f"data x fsdp = {dp} ({shd.describe(mesh)})")
    if (cfg.batch_size // cfg.grad_accum) % dp:
        log(f"warning: micro-batches of {cfg.batch_size // cfg.grad_accum} rows do not split "
            f"over data x fsdp = {dp}: each is replicated (every device computes every row); "
            "lower grad_accum or raise batch_size")
    workdir = Path(cfg.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = TrainCheckpoints(workdir / "checkpoints", cfg.keep_checkpoints,
                             cfg.async_checkpointing)
    resume_step = ckpts.latest_step()
    try:  # before any data or model work
        check_sources(cfg)
        if resume_step is not None:
            check_resume(cfg, workdir, resume_step)
        tokenizer, stream, eval_batches, stats = build_data(cfg, workdir)
    except BaseException:
        ckpts.close()
        raise
    log(f"data: {stats.rows} rows, {stats.skipped} skipped, {stats.truncated} truncated to "
        f"{cfg.data.seq_len} tokens ({stats.no_targets} of them left with no target), "
        f"{stats.target_tokens} target tokens, {stream.rows_per_epoch} rows/epoch "
        f"({'packed' if cfg.data.pack else 'padded'})")
    if resume_step is not None:
        config = LlamaConfig.from_dict(json.loads((workdir / MODEL_CONFIG).read_text()))
        params = None
    else:
        config, params = build_model(cfg, len(tokenizer), mesh, rules)
        if jax.process_index() == 0:
            (workdir / MODEL_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
            (workdir / TRAIN_CONFIG).write_text(cfg.to_json_best_effort(indent=2))
    tx, schedule = make_optimizer(cfg)
    params_abstract = params if params is not None else jax.eval_shape(
        lambda: init_params(config, jax.random.PRNGKey(0)))
    keys = trainable_keys(params_abstract, cfg.mode)
    abstract = abstract_state(config, tx, keys, params_abstract)
    part = make_partitioning(mesh, rules, abstract, cfg.batch_size, cfg.data.seq_len)
    if resume_step is not None:  # restored straight into this mesh's shards, whatever the
        target = jax.tree.map(  # mesh that wrote the checkpoint
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
            part.state)
        resume_step, params, opt_state, meta = ckpts.restore_latest(target["params"],
                                                                    target["opt_state"])
        log(f"resumed from step {resume_step} ({meta.get('data_position')})")
    else:
        opt_state = jax.jit(tx.init, out_shardings=part.state["opt_state"])(
            {k: params[k] for k in keys})
    state = {"step": jax.device_put(jnp.asarray(resume_step or 0, jnp.int32),
                                    part.state["step"]),
             "params": params, "opt_state": opt_state}
    step_fn = make_train_step(config, cfg, tx, schedule, keys, part)
    rows = shd.process_rows(part.batch, cfg.batch_size)
    log(f"mesh {shd.describe(mesh)} over {jax.device_count()} devices in "
        f"{jax.process_count()} process(es); process 0 feeds batch rows {rows}")
    if jax.process_count() > 1 and eval_batches:  # global (replicated) arrays for eval
        eval_batches = [shd.place(b, jax.tree.map(lambda _: part.replicated, b))
                        for b in eval_batches]
    writer = _tensorboard(workdir)
    exits = train_exits(config, cfg.mode)
    step = int(resume_step or 0)
    stop = _StopFlag()
    tokens_per_step = cfg.batch_size * cfg.data.seq_len
    t_last, steps_since, history = time.perf_counter(), 0, []
    pending = None  # (step, metrics) not yet checked for NaN / inf

    def save(step_now, force=False):
        check_finite(step_now, metrics)  # this step's loss / grad norm, before writing it
        meta = {"step": step_now, "seed": cfg.seed, "data_position": stream.position(step_now),
                "model": config.to_dict(), "mode": cfg.mode}
        try:
            ckpts.save(step_now, state["params"], state["opt_state"], meta, force=force)
        except NonFiniteParamsError as e:
            raise TrainingDiverged(str(e)) from None

    try:
        while step < cfg.total_steps:
            batch = shd.global_batch(lambda lo, hi, k=step: batch_rows(stream, k, lo, hi),
                                     part.batch, cfg.batch_size)
            state, metrics = step_fn(state, batch)
            if pending is not None:  # one step behind: the host never waits on the device
                check_finite(*pending)
            step += 1
            pending = (step, metrics)
            steps_since += 1
            if on_step is not None:
                on_step(step)
            if jax.process_count() > 1:  # a signal on any host stops every host at this step
                stop.signum = _agree_on_signal(stop.signum)
            if step % cfg.log_every == 0 or step == cfg.total_steps or stop.signum:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                tok_s = steps_since * tokens_per_step / (now - t_last)
                t_last, steps_since = now, 0
                m.update(step=step, tokens_per_s=tok_s, epoch=stream.epochs_at(step))
                history.append(m)
                log(_format_metrics(step, cfg.total_steps, m, tok_s, exits))
                _write_metrics(workdir, writer, step, m)
            if cfg.eval_every and step % cfg.eval_every == 0 and eval_batches:
                _evaluate(config, state["params"], eval_batches, workdir, writer, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                save(step)
            if stop.signum:
                if step % cfg.checkpoint_every and step != cfg.total_steps:
                    save(step, force=True)
                ckpts.wait()
                log(f"signal {stop.signum}: checkpointed step {step}; rerun the same command "
                    "to resume")
                return {"status": "interrupted", "step": step, "workdir": str(workdir),
                        "history": history, "mesh": shd.describe(mesh), "batch_rows": rows}
        if pending is not None:
            check_finite(*pending)
        ckpts.wait()
        results = (_evaluate(config, state["params"], eval_batches, workdir, writer, step)
                   if eval_batches else {})
    finally:
        stop.restore()
        ckpts.close()
        if writer is not None:
            writer.close()
    return {"status": "done", "step": step, "workdir": str(workdir), "history": history,
            "eval": results, "config": config, "params": state["params"],
            "data_stats": stats, "mesh": shd.describe(mesh), "batch_rows": rows}


def batch_rows(stream: data_lib.BatchStream, k: int, lo: int, hi: int) -> dict:
    """Rows [lo, hi) of global batch k (what `stream.batch(k)[key][lo:hi]` holds), built
    without the other rows: one process's part of the batch."""
    if (lo, hi) == (0, stream.batch_size):
        return stream.batch(k)
    rows = []
    for g in range(k * stream.batch_size + lo, k * stream.batch_size + hi):
        e, r = divmod(g, stream.rows_per_epoch)
        rows.append({key: v[r] for key, v in stream._epoch(e).items()})
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _agree_on_signal(signum):
    """The first signal number any process got (0 / None when none did)."""
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.asarray(signum or 0, np.int32))
    nz = [int(x) for x in np.ravel(got) if x]
    return nz[0] if nz else None


def _tensorboard(workdir: Path):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tb"))


def _write_metrics(workdir: Path, writer, step: int, metrics: dict) -> None:
    if jax.process_index() != 0:
        return
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({k: float(v) for k, v in metrics.items()}) + "\n")
    for k, v in metrics.items():
        writer.add_scalar(f"train/{k}", v, step)
    writer.flush()


def _evaluate(config, params, batches, workdir: Path, writer, step: int) -> dict:
    res = per_exit_metrics(config, params, batches)
    log("eval " + " ".join(f"{e}: loss {r['loss']:.3f} acc {r['accuracy']:.3f}"
                           for e, r in res.items()))
    if writer is not None:
        for e, r in res.items():
            writer.add_scalar(f"eval/loss_exit_{e}", r["loss"], step)
            writer.add_scalar(f"eval/accuracy_exit_{e}", r["accuracy"], step)
        with open(workdir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{str(e): r for e, r in res.items()}}) + "\n")
    return res


DEBUG_ENV = "SOFT_JAX_DEBUG"  # =1: full tracebacks instead of one-line errors


def _debug() -> bool:
    import os

    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or bool(
        _FLAGS is not None and _FLAGS["debug"].value)


def _fail(msg: str, code: int) -> None:
    print(f"error: {msg}", file=__import__("sys").stderr, flush=True)
    raise SystemExit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors: an unknown `--config.x` is named, with the
    config file's fields, instead of an ml_collections traceback."""
    from soft_jax.train_config import check_override_names, load_config_file

    if not any(a == "--debug" for a in argv) and not _debug():
        try:
            path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
            if path is None and "--config" in argv[:-1]:
                path = argv[argv.index("--config") + 1]
            if path is not None:
                check_override_names(load_config_file(path), argv)
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e), 2)
    try:
        return _FLAGS(argv)
    except Exception as e:  # noqa: BLE001  bad values, missing --config: one line
        if _debug():
            raise
        _fail(f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (--helpfull for "
              "flags; --debug or SOFT_JAX_DEBUG=1 for a traceback)", 2)


def main(argv) -> None:
    """absl entry point: `--config` file plus `--config.field=value` overrides.

    Config and data errors print one line and exit 2, a diverged run exits 3; `--debug` or
    SOFT_JAX_DEBUG=1 shows the traceback instead."""
    del argv
    from absl import logging

    from soft_jax.checkpoint import CheckpointError

    if not _FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        result = train(_FLAGS.config)
    except TrainingDiverged as e:
        if _debug():
            raise
        _fail(str(e), 3)
    except (ValueError, FileNotFoundError, KeyError, CheckpointError) as e:
        if _debug():
            raise
        _fail(f"{e} (--debug or SOFT_JAX_DEBUG=1 for a traceback)", 2)
    if result["status"] == "interrupted":
        raise SystemExit(0)


_FLAGS = None

if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                    lock_config=True)
    flags.DEFINE_bool("debug", False, "full tracebacks instead of one-line errors")
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
