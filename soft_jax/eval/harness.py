"""lm-evaluation-harness on every exit: the `soft_jax` model adapter and `run_exits` (its
command is `soft-jax harness`).

The model is loaded once and evaluated by lm-eval once per exit; OUT gets results.json,
results.md (an exit x task table), metrics_per_exit.png, the per-exit lm-eval samples and
the offline task YAMLs (tasks/: soft_gsm8k, soft_gsm8k_ppl, soft_arith_mc, always
available). As an lm-eval model: `lm_eval --model soft_jax --model_args hf=DIR,exit=12`
after `import soft_jax.eval.harness` (model_args: ckpt= or hf=, exit=, dtype=, batch_size=,
max_length=, tokenizer=, add_bos_token=, max_gen_toks=, seed=).

Scoring follows lm-eval's Hugging Face backend: contexts and continuations are tokenised
together, BOS comes from the tokenizer's own `add_special_tokens` default (a LLaMA
tokenizer adds it; `add_bos_token=` overrides), an empty context is scored after the BOS
(else EOS) token, inputs longer than max_length are cut from the left, and rolling
log-likelihoods use lm-eval's disjoint windows. Log-likelihoods come from `exit_logits` of
the chosen exit (computed on that exit's sub-model), generations from `soft_jax.generate`
with `exit_layer`; stop strings are cut from the decoded text, and stop strings that are one
token also end decoding early.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from soft_jax.io.hf import submodel
from soft_jax.eval.prompting import generate_ids
from soft_jax.eval.runner import open_model, resolve_exits
from soft_jax.io.loading import LoadedModel
from soft_jax.model.exits import check_heads
from soft_jax.model.transformer import exit_logits


def _positive_int(name: str, value) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"soft_jax model_args: {name}={value!r} must be a positive int")
    return int(value)


def load(ckpt: str = "", hf: str = "", tokenizer: str = "", dtype: str | None = None,
         field: str = "model_args", allow_unverified: bool = False) -> LoadedModel:
    """The model (and tokenizer) of a checkpoint or HF folder; `dtype` casts either."""
    source = {"ckpt": ckpt, "hf": hf, "tokenizer": tokenizer}
    return open_model(source, "model", field, dtype or "float32", ckpt_dtype=dtype,
                      allow_unverified=allow_unverified)


@partial(jax.jit, static_argnames=("config",))
def _token_scores(config, params, ids, targets):
    """Per position: log p(target) and whether target is the argmax, at the last layer."""
    logits = exit_logits(config, params, ids, exits=(config.num_layers,))[config.num_layers]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return (jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0],
            jnp.argmax(logits, axis=-1) == targets)


def _bucket(n: int, cap: int) -> int:
    """Padded length: the next power of two (at least 16), at most `cap` (fewer compiles)."""
    return min(max(16, 1 << (n - 1).bit_length()), cap)


@register_model("soft_jax")
class SoftJaxLM(TemplateLM):
    """lm-eval model: one exit (sub-model of the first `exit` layers) of a soft_jax model."""

    def __init__(self, ckpt: str = "", hf: str = "", exit=None, dtype: str | None = None,
                 batch_size=8, max_length=None, tokenizer: str = "", add_bos_token=None,
                 max_gen_toks=256, seed=0, model: LoadedModel | None = None, device=None,
                 max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"soft_jax model_args: unknown argument(s) {sorted(unknown)}; "
                             "expected ckpt, hf, exit, dtype, batch_size, max_length, "
                             "tokenizer, add_bos_token, max_gen_toks, seed")
        if model is None:
            model = load(ckpt, hf, tokenizer, dtype)
        self.model, self.tokenizer = model, model.tokenizer
        n = model.config.num_layers
        self.exit = n if exit in (None, "") else resolve_exits(model.config, [exit],
                                                               "model_args.exit")[0]
        check_heads(model.config, model.params, (self.exit,), "model_args.exit")
        self.sub_config, self.sub_params = submodel(model.config, model.params, self.exit)
        self.batch_size = _positive_int("batch_size", batch_size)
        self._max_length = _positive_int("max_length", max_length or
                                         model.config.max_position_embeddings)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed = int(seed)
        if self.tokenizer.eos_token_id is None and self.tokenizer.bos_token_id is None:
            raise ValueError("soft_jax model_args: the tokenizer has neither a BOS nor an EOS "
                             "token to score an empty context after")

    # ------------------------------------------------------------------ tokenisation
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "soft_jax")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """Token ids as lm-eval's HF backend makes them (tokenizer default BOS handling)."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if string.startswith(self.tokenizer.decode([self.prefix_token_id])):
                add_special_tokens = False  # the text already starts with BOS
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum log p(continuation), continuation is greedy) per (key, context, cont)."""
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list = [None] * len(requests)
        bs, cap = self.batch_size, self.max_length
        for s in tqdm(range(0, len(order), bs), disable=disable_tqdm,
                      desc=f"loglikelihood exit {self.exit}"):
            idx = order[s:s + bs]
            seqs = [(requests[i][1] + requests[i][2])[-(cap + 1):] for i in idx]
            width = _bucket(max(len(q) - 1 for q in seqs), cap)
            ids = np.zeros((bs, width), np.int32)
            tgt = np.zeros((bs, width), np.int32)
            for r, q in enumerate(seqs):  # right padding leaves earlier positions unchanged
                ids[r, :len(q) - 1], tgt[r, :len(q) - 1] = q[:-1], q[1:]
            logp, greedy = jax.device_get(_token_scores(self.sub_config, self.sub_params,
                                                        ids, tgt))
            for r, i in enumerate(idx):
                n_in, n_cont = len(seqs[r]) - 1, len(requests[i][2])
                sl = slice(n_in - n_cont, n_in)
                out[i] = (float(logp[r, sl].sum()), bool(greedy[r, sl].all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text over lm-eval's disjoint rolling windows."""
        windows, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + w)
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _stop_token_ids(self, until: list[str]) -> list[int]:
        ids = [self.tokenizer.encode(u, add_special_tokens=False) for u in until if u]
        return [t[0] for t in ids if len(t) == 1]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if asked) continuations from this exit, cut at `until`."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None \
            else None
        out: list = [None] * len(requests)
        for idx in groups.values():
            kw = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = _positive_int("max_gen_toks", kw.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt within "
                                 f"max_length={self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0],
                                       left_truncate_len=self.max_length - max_new)
                       for i in idx]
            sample = kw.get("do_sample") and kw.get("temperature", 0) > 0
            gens = generate_ids(
                self.model, prompts, self.exit, max_new, self.batch_size,
                stop_tokens=self._stop_token_ids(until), temperature=(
                    float(kw["temperature"]) if sample else 0.0),
                top_k=int(kw.get("top_k") or 0) if sample else 0,
                top_p=float(kw.get("top_p") or 1.0) if sample else 1.0, seed=self.seed)
            for i, g in zip(idx, gens):
                text = self.tokenizer.decode(g, skip_special_tokens=True)
                out[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


# ------------------------------------------------------------------------------ CLI
def _metric_columns(task_results: dict) -> dict[str, float]:
    """{"metric,filter": value} without stderr entries, aliases and sample counts."""
    return {k: float(v) for k, v in task_results.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))}


def run_exits(model: LoadedModel, exits, tasks: list[str], out: Path, include_paths=(),
              limit=None, num_fewshot=None, batch_size: int = 8, max_length=None,
              max_gen_toks: int = 256) -> dict:
    """lm-eval once per exit of one loaded model; writes and returns the exit x task table."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from soft_jax.eval.harness_tasks import write_offline_tasks
    from soft_jax.eval.report import line_figure

    out.mkdir(parents=True, exist_ok=True)
    paths = [str(write_offline_tasks(out / "tasks")), *map(str, include_paths)]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if any(t not in tm.all_tasks for t in tasks):  # indexing lm-eval's own tasks takes ~10 s
        tm = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; offline ones are soft_gsm8k, "
                         "soft_gsm8k_ppl, soft_arith_mc (others via --include-path)")
    table, seconds, t_all = {}, {}, time.perf_counter()
    for e in exits:
        t0 = time.perf_counter()
        lm = SoftJaxLM(model=model, exit=e, batch_size=batch_size, max_length=max_length,
                       max_gen_toks=max_gen_toks)
        res = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                              limit=limit, task_manager=tm, bootstrap_iters=0,
                              log_samples=True)
        seconds[str(e)] = round(time.perf_counter() - t0, 2)
        table[str(e)] = {t: _metric_columns(res["results"][t]) for t in tasks}
        documents = {t: res["n-samples"][t]["effective"] for t in tasks}
        with open(out / f"samples_exit{e}.jsonl", "w") as f:
            for t in tasks:
                for s in res["samples"][t]:
                    f.write(json.dumps({"task": t, **s}, default=str) + "\n")
        print(f"[harness] exit {e}: " + "; ".join(
            f"{t} " + ", ".join(f"{k} {v:.4g}" for k, v in m.items())
            for t, m in table[str(e)].items()) + f" ({seconds[str(e)]}s)", flush=True)
    result = {"model": model.source, "num_layers": model.config.num_layers,
              "exits": [int(e) for e in exits], "tasks": list(tasks), "limit": limit,
              "num_fewshot": num_fewshot, "documents": documents, "results": table, "seconds_per_exit": seconds,
              "seconds": round(time.perf_counter() - t_all, 2)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    cols = [(t, m) for t in tasks for m in table[str(exits[0])][t]]
    md = [f"# lm-evaluation-harness per exit: {model.source}", "",
          f"lm-eval {_lm_eval_version()}, limit {limit}, num_fewshot {num_fewshot}; "
          f"{result['seconds']} s in all.", "",
          "| exit | " + " | ".join(f"{t} {m}" for t, m in cols) + " |",
          "|---|" + "---|" * len(cols)]
    md += [f"| {e} | " + " | ".join(f"{table[str(e)][t][m]:.4g}" for t, m in cols) + " |"
           for e in exits]
    (out / "results.md").write_text("\n".join(md) + "\n")
    line_figure(out / "metrics_per_exit.png", list(exits),
                {f"{t} {m}": [table[str(e)][t][m] for e in exits] for t, m in cols},
                "metric", f"lm-eval metrics per exit ({model.config.num_layers} layers)")
    return result


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
