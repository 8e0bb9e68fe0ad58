"""Run the eval tasks of an eval config over one model (and optionally a second one) and write
results.json, report.md, PNG figures and the per-example JSONL files into config.out_dir."""

from __future__ import annotations

import json
import time
from pathlib import Path

from soft_jax.data import formats as data_lib
from soft_jax.eval.config import validate
from soft_jax.eval.prompting import jsonable, log
from soft_jax.eval.tasks import TASK_FNS
from soft_jax.io.loading import LoadedModel
from soft_jax.model.config import LlamaConfig
from soft_jax.model.exits import check_heads
from soft_jax.model.layer_counts import layer_count


# ------------------------------------------------------------------------------ models
def open_model(section, name: str, field: str, dtype: str = "float32",
               ckpt_dtype: str | None = None, allow_unverified: bool = False) -> LoadedModel:
    """The model a config section names: its `ckpt` (a soft_jax checkpoint / work dir, cast to
    `ckpt_dtype` if given) or `hf` folder (loaded in `dtype`), with its tokenizer (or the
    section's `tokenizer`), labelled `name`. Errors name the field (`field`.ckpt, ...).
    `allow_unverified`: see `io.checkpoint.load_params`."""
    from soft_jax.io.checkpoint import CheckpointError
    from soft_jax.io.loading import TokenizerError, load_model

    ckpt, hf, tokenizer = (str(section.get(k) or "") for k in ("ckpt", "hf", "tokenizer"))
    if bool(ckpt) == bool(hf):
        raise ValueError(f"{field}.ckpt / {field}.hf: set exactly one")
    if tokenizer.startswith("bpe:"):
        raise ValueError(f"{field}.tokenizer={tokenizer!r}: eval needs the tokenizer the model "
                         "was trained with (a folder), not a new BPE")
    key, path = ("ckpt", ckpt) if ckpt else ("hf", hf)
    try:
        model = load_model(path, dtype if hf else ckpt_dtype, tokenizer=tokenizer or True,
                           allow_unverified=allow_unverified)
    except TokenizerError as e:
        raise ValueError(f"{field}.tokenizer: {e}") from None
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise type(e)(f"{field}.{key}={path!r}: {e}") from None
    if model.tokenizer is None:
        raise ValueError(f"{field}.tokenizer: no tokenizer is saved with {path!r}; set "
                         f"{field}.tokenizer to a tokenizer folder")
    return model.replace(name=name)


def resolve_exits(config: LlamaConfig, exits, field: str = "config.exits") -> tuple[int, ...]:
    """The chosen exits, sorted (empty = the config's exits incl. the last layer)."""
    if isinstance(exits, (int, str)) and not isinstance(exits, bool):
        exits = [exits]
    exits = list(exits or ())
    if not exits:
        return config.resolved_exits

    def count(e):
        if isinstance(e, str) and e.strip().lstrip("-").isdigit():
            e = int(e)
        return layer_count(e, config.num_layers, f"{field}:")

    return tuple(sorted({count(e) for e in exits}))


def run_eval(cfg) -> dict:
    """Run every task of `cfg` (see soft_jax/eval/config.py); returns the results dict that
    is also written to out_dir/results.json, with report.md and PNG figures beside it."""
    from soft_jax.eval.report import write_report

    validate(cfg)
    tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    t0 = time.perf_counter()
    model = open_model(cfg, cfg.name, "config", cfg.dtype,
                       allow_unverified=cfg.allow_unverified)
    model = model.replace(chat=data_lib.resolve_template(cfg.template, model.tokenizer,
                                                         "gsm8k") == "chat")
    exits = resolve_exits(model.config, cfg.exits, "config.exits")
    check_heads(model.config, model.params, exits, "config.exits")
    ctx: dict = {"chat_tokenizer": model.tokenizer if model.chat else None}
    if (cfg.second.ckpt or cfg.second.hf) and {"pairwise", "sortedness"} & set(tasks):
        second = open_model(cfg.second, cfg.second.name, "config.second", cfg.dtype,
                            allow_unverified=cfg.allow_unverified).replace(chat=model.chat)
        ctx["second"] = second
        if cfg.second.exits:
            ctx["second_exits"] = resolve_exits(second.config, cfg.second.exits,
                                                "config.second.exits")
        else:
            ctx["second_exits"] = tuple(e for e in exits if e <= second.config.num_layers) \
                or second.config.resolved_exits
        check_heads(second.config, second.params, ctx["second_exits"],
                    "config.second.exits")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{model.name}: {model.source} ({model.config.num_layers} layers), exits {exits}, "
        f"tasks {tasks} -> {out}")
    results = {
        "model": {"name": model.name, "source": model.source,
                  "num_layers": model.config.num_layers, "hidden_size": model.config.hidden_size,
                  "vocab_size": model.config.vocab_size},
        "exits": list(exits), "tasks": tasks, "config": cfg.to_dict(),
    }
    if "second" in ctx:
        s = ctx["second"]
        results["second_model"] = {"name": s.name, "source": s.source,
                                   "num_layers": s.config.num_layers,
                                   "exits": list(ctx["second_exits"])}
    for task in tasks:
        t = time.perf_counter()
        results[task] = TASK_FNS[task](cfg, model, exits, out, ctx)
        results[task]["seconds"] = round(time.perf_counter() - t, 2)
    results["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=2))
    write_report(results, out)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return results
