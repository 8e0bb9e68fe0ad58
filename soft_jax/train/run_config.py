"""The training config schema: every field a run may set, with its default.

Config files in configs/ start from `default_config()` and override; `validate` rejects
fields the schema does not know, naming them.
"""

from __future__ import annotations

import copy

import ml_collections

from soft_jax.data.formats import FORMATS, TEMPLATES
from soft_jax.parallel.distributed import MODES as DISTRIBUTED_MODES
from soft_jax.train.modes import MODES
from soft_jax.train.recipes import check_recipe

def default_config() -> ml_collections.ConfigDict:
    """All training fields with defaults (a tiny random model on the packaged GSM8K demo)."""
    c = ml_collections.ConfigDict()
    c.mode = "soft"  # soft | sft | ict | sortednet
    c.exits = (2, 3, 4)  # 1-based layer counts; the last layer is always added
    c.exit_weights = ()  # empty = equal weights (the paper's mean)
    c.workdir = "runs/tiny"
    c.total_steps = 60
    c.checkpoint_every = 20
    c.keep_checkpoints = 2
    c.async_checkpointing = True
    c.seed = 42
    c.log_every = 10
    c.eval_every = 0  # 0 = only at the end
    c.eval_batches = 4

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # a name in soft_jax.model.config.PRESETS (random init)
    c.model.init_from = ""  # "" = random init; or a HF folder / hub name / soft_jax checkpoint
    c.model.overrides = ml_collections.ConfigDict({"vocab_size": 0})  # 0 = tokenizer's size
    c.model.param_dtype = "float32"  # master weights
    c.model.dtype = "float32"  # compute dtype ("bfloat16" for mixed precision)
    c.model.remat_policy = "none"

    c.data = ml_collections.ConfigDict()
    c.data.format = "gsm8k"  # alpaca | gsm8k | triviaqa | chat | sharegpt | text
    c.data.template = "auto"  # chat | plain | auto (= chat when the tokenizer has a template)
    c.data.source = "gsm8k_demo:train"  # local .json/.jsonl/.parquet, hub name, or gsm8k_demo:*
    c.data.subset = ""
    c.data.split = "train"
    c.data.eval_source = "gsm8k_demo:heldout"
    c.data.eval_split = "test"
    c.data.tokenizer = "bpe:1024"  # folder / hub name / gguf:FILE / bpe:N (trained on the data)
    c.data.seq_len = 256
    c.data.pack = True
    c.data.on_bad_row = "error"  # error | skip
    c.data.max_rows = 0  # 0 = all

    c.batch_size = 8  # sequences per optimizer step (per micro-batch x grad_accum)
    c.grad_accum = 1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 6
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip = 1.0

    # Divergence guard (train/guard.py): NaN / inf, a zero gradient norm or a loss far above
    # its recent median, the last two for several steps in a row, stop the run (exit 3) with
    # the last good checkpoint kept as the latest; `retries` > 0 instead restores it and skips
    # the batches since (PaLM's practice), that many times. 0 steps turns a rule off. The
    # defaults are quiet on healthy runs: a fine-tune's loss falls, and a single spike ends.
    c.guard = ml_collections.ConfigDict()
    c.guard.zero_grad_steps = 5  # steps in a row with gradient norm <= zero_grad_norm
    c.guard.zero_grad_norm = 1e-12
    c.guard.spike_factor = 3.0  # loss above this x the median of the recent healthy losses ...
    c.guard.spike_steps = 5  # ... for this many steps in a row
    c.guard.spike_window = 100  # steps of that median (the first 10 are never judged)
    c.guard.retries = 0  # restore-and-skip attempts before the run stops

    c.loss = ml_collections.ConfigDict()
    c.loss.impl = "auto"  # auto | plain | chunked | chunked_recompute (soft_jax/loss.py)
    c.loss.chunk_tokens = 0  # tokens per chunk of the chunked loss; 0 = backend default
    c.loss.z_loss = 0.0
    # Exit-loss recipe (soft_jax/train/recipes.py): paper | depth | last_boost | distill |
    # last_boost_distill | layerskip; the other fields are read only by the recipes they name.
    c.loss.recipe = "paper"
    c.loss.last_weight = 0.0  # last_boost(_distill): the last layer's weight (others 1); 0 = |E| - 1
    c.loss.distill_weight = 1.0  # (last_boost_)distill: factor of KL(p_last || p_exit)
    c.loss.layer_dropout = 0.2  # layerskip: skip rate at the last layer (0 at the first)
    c.loss.curriculum_period = 2  # layerskip: rotational curriculum period R (1 = off)

    # Device mesh (soft_jax/sharding.py): total axis sizes, one of them may be -1 = the rest.
    # data: params replicated; fsdp: params / grads / optimizer state sharded (ZeRO-3);
    # tensor: heads / MLP / vocab split. The batch is split over data x fsdp.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1  # part of `data` that spans TPU slices / hosts (over DCN)
    c.mesh.dcn_fsdp = 1  # part of `fsdp` that spans TPU slices / hosts (over DCN)
    c.mesh.rules = ()  # overrides of sharding.RULES, e.g. (("activation_embed", "tensor"),)

    # Multi-process runtime (soft_jax/distributed.py). Empty / -1 fields are read from
    # SOFT_JAX_COORDINATOR / SOFT_JAX_NUM_PROCESSES / SOFT_JAX_PROCESS_ID, else detected
    # (SLURM srun, Cloud TPU pod); a single process when nothing is found.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.mode = "auto"  # auto | on (always jax.distributed.initialize()) | off
    c.distributed.coordinator = ""  # host:port of process 0
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.local_device_ids = ""  # e.g. "0,1,2,3"; "" = jax's default
    c.distributed.cpu_collectives = "gloo"  # CPU cross-process collectives ("" = jax default)
    c.distributed.initialization_timeout = 300
    return c


def unknown_fields(cfg, ref, open_keys=(), prefix="") -> list[str]:
    """Dotted names of fields in `cfg` that the schema `ref` lacks (`open_keys` take any)."""
    out = []
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in ref:
            out.append(name)
        elif isinstance(ref[key], ml_collections.ConfigDict) and key not in open_keys:
            out += unknown_fields(cfg[key], ref[key], open_keys, name + ".")
    return out


def with_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `cfg` with each schema field it lacks (e.g. `guard` or `loss.recipe` in a
    train_config.json written before they existed) set to its default."""
    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        _fill(cfg, default_config())
    return cfg


def _fill(cfg: ml_collections.ConfigDict, ref: ml_collections.ConfigDict) -> None:
    for key in ref.keys():
        if key not in cfg:
            cfg[key] = copy.deepcopy(ref[key])
        elif (key != "overrides" and isinstance(ref[key], ml_collections.ConfigDict)
              and isinstance(cfg[key], ml_collections.ConfigDict)):
            _fill(cfg[key], ref[key])


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming unknown fields or bad values."""
    unknown = unknown_fields(cfg, default_config(), open_keys=("overrides",))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; see soft_jax/train/run_config.py")
    if cfg.mode not in MODES:
        raise ValueError(f"config.mode={cfg.mode!r}; expected one of {MODES}")
    for name in ("total_steps", "batch_size", "grad_accum", "checkpoint_every",
                 "keep_checkpoints", "log_every"):
        if int(cfg[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {cfg[name]}")
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"config.batch_size={cfg.batch_size} must be divisible by "
                         f"config.grad_accum={cfg.grad_accum}")
    if cfg.data.format not in FORMATS:
        raise ValueError(f"config.data.format={cfg.data.format!r}; expected one of "
                         f"{sorted(FORMATS)}")
    if cfg.data.on_bad_row not in ("error", "skip"):
        raise ValueError(f"config.data.on_bad_row={cfg.data.on_bad_row!r}; expected 'error' "
                         "or 'skip'")
    if int(cfg.data.seq_len) < 2:
        raise ValueError(f"config.data.seq_len must be >= 2, got {cfg.data.seq_len}")
    if cfg.mode == "ict" and not cfg.model.init_from:
        raise ValueError("config.mode='ict' needs config.model.init_from: an SFT checkpoint")
    for name in ("data", "fsdp", "tensor"):
        if int(cfg.mesh[name]) < 1 and int(cfg.mesh[name]) != -1:
            raise ValueError(f"config.mesh.{name}={cfg.mesh[name]}; expected a positive size "
                             "or -1 (the rest of the devices)")
    if cfg.data.template not in TEMPLATES:
        raise ValueError(f"config.data.template={cfg.data.template!r}; expected "
                         f"{', '.join(TEMPLATES)}")
    check_recipe(cfg.loss)
    _validate_guard(cfg.guard)
    if cfg.distributed.mode not in DISTRIBUTED_MODES:
        raise ValueError(f"config.distributed.mode={cfg.distributed.mode!r}; expected "
                         f"{', '.join(DISTRIBUTED_MODES)}")


def _validate_guard(g) -> None:
    for name in ("zero_grad_steps", "spike_steps", "retries"):
        if isinstance(g[name], bool) or not isinstance(g[name], int) or g[name] < 0:
            raise ValueError(f"config.guard.{name} must be an int >= 0 (0 = off), got {g[name]!r}")
    if not g.spike_window >= 1:
        raise ValueError(f"config.guard.spike_window must be >= 1, got {g.spike_window!r}")
    if not g.spike_factor > 1:  # nan fails too
        raise ValueError(f"config.guard.spike_factor must be > 1 (a multiple of the median "
                         f"loss), got {g.spike_factor!r}")
    if not 0 <= g.zero_grad_norm < float("inf"):
        raise ValueError(f"config.guard.zero_grad_norm must be a finite number >= 0, got "
                         f"{g.zero_grad_norm!r}")


# Fields a resumed run may change: how it runs, logs, checkpoints and is laid out on
# devices, not what it learns. Everything else must match the saved train_config.json.
RESUME_MAY_CHANGE = ("workdir", "total_steps", "checkpoint_every", "keep_checkpoints",
                     "async_checkpointing", "log_every", "eval_every", "eval_batches",
                     "grad_accum", "data.eval_source", "data.eval_split", "loss.impl",
                     "loss.chunk_tokens", "model.remat_policy", "mesh", "distributed",
                     "guard")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(field, saved value, new value) for each field that changes what a resumed run
    trains (both configs as JSON dicts). A field the saved config predates reads as its
    default (what the run did before the field existed); other absent fields read as None."""
    import json

    a = {**_flatten(json.loads(default_config().to_json_best_effort())), **_flatten(saved)}
    b = _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
            and not any(k == f or k.startswith(f + ".") for f in RESUME_MAY_CHANGE)]


PAPER_DATA = {  # task -> (format, hub source, subset, train split, eval split)
    "alpaca": ("alpaca", "tatsu-lab/alpaca", "", "train", ""),
    "gsm8k": ("gsm8k", "openai/gsm8k", "main", "train", "test"),
    "triviaqa": ("triviaqa", "mandarjoshi/trivia_qa", "rc.nocontext", "train", "validation"),
}
PAPER_EXAMPLES = {"alpaca": 52002, "gsm8k": 7473, "triviaqa": 138384}


def paper_recipe(task: str = "alpaca", mode: str = "soft") -> ml_collections.ConfigDict:
    """The paper's setup: LLaMA-2 13B, exits 12..40 step 4, lr 2e-5 cosine, batch 32 (grad
    accumulation 8), seq 2048, seed 42, 2 epochs (1 for the ICT heads)."""
    c = default_config()
    fmt, source, subset, split, eval_split = PAPER_DATA[task]
    c.mode = mode
    c.exits = tuple(range(12, 41, 4))
    c.workdir = f"runs/llama2-13b-{task}-{mode}"
    c.seed = 42
    c.model.preset = "llama2-13b"
    c.model.init_from = "meta-llama/Llama-2-13b-hf"
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "save_dots"
    c.data.format, c.data.source, c.data.subset, c.data.split = fmt, source, subset, split
    c.data.eval_source = source if eval_split else ""
    c.data.eval_split = eval_split
    c.data.tokenizer = ""  # the model's own tokenizer
    c.data.seq_len = 2048
    c.data.pack = False  # one example per row, as in the paper
    c.batch_size = 32
    c.grad_accum = 8
    # ZeRO-3 over every device: a 13B state (208 GB in float32 with AdamW) fits no single
    # accelerator. So set, the recipe launches as it is on a v5p-32 or v5p-64 (the TPU
    # compiler's peak: 61.6 / 50.1 GiB of 95.7 per chip). Other slices need, from
    # `soft-jax compile --fit` (docs/tpu.md): v5e-32 --config.model.remat_policy=
    # save_qkv_out --config.grad_accum=1; v4-32 remat_policy=full grad_accum=1; v4-64
    # remat_policy=save_dots grad_accum=1; v6e-64 --config.mesh.tensor=2 remat_policy=
    # save_dots grad_accum=1; v5e-256 --config.mesh.tensor=8 remat_policy=none grad_accum=1.
    # On 8 or more chips grad_accum=8 leaves micro-batches of 4 rows, replicated on each chip.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    epochs = 1 if mode == "ict" else 2
    c.total_steps = epochs * -(-PAPER_EXAMPLES[task] // c.batch_size)
    c.checkpoint_every = 500
    c.log_every = 10
    c.eval_every = 500
    c.optimizer.lr = 2e-5
    c.optimizer.warmup_steps = int(0.03 * c.total_steps)
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b2 = 0.999
    if mode == "ict":  # heads on top of the finished SFT run
        c.model.init_from = f"runs/llama2-13b-{task}-sft"
    return c
