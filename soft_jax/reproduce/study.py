"""The exit-loss recipe study: SFT and SoFT with every recipe of soft_jax/train/recipes.py from
the same converted SmolLM2-135M weights, the budget and seed of the reproduction, then every
exit evaluated (held-out loss / accuracy, KL to the last layer, the `decoding` eval task), and
the two best recipes plus `paper` again at 4x the steps, with SFT at 4x as their reference.

Stage-cached like `soft_jax.reproduce.stages` (same run-dir layout: NAME/done.json,
eval/NAME/TASK.json); its command is `soft-jax reproduce --study`.
"""

from __future__ import annotations

import json
from pathlib import Path

from soft_jax.reproduce.plan import EXITS, SIZES, STUDY_RUNS as RUNS, STUDY_TASKS as TASKS, stage_path
from soft_jax.reproduce.study_report import write_study_report
from soft_jax.reproduce.stages import (cached, convert_stage, default_gguf, eval_stage, log,
                                       train_stage)

LONG = 4  # the budget multiple of the second round
LONG_RUNS = 3  # `paper` and the two best recipes
LONG_REFERENCE = "sft"  # also trained at 4x: the last-layer gap is measured at equal budget
TARGETS = {"last_loss": 0.90, "exit_loss_ratio": 1.05,
           "acceptance": {21: 0.35, 24: 0.50, 27: 0.60}}


def study_size(long: bool = False) -> dict:
    """The reproduction's CPU size; `long`: LONG x the steps (same lr schedule shape)."""
    size = dict(SIZES["cpu"])
    if long:
        size.update(steps=LONG * size["steps"], warmup=LONG * size["warmup"])
    return size


def _run_dir(run: Path, long: bool) -> Path:
    """The 4x runs live in their own run dir, their base checkpoint linked from the first."""
    if not long:
        return run
    sub = run / f"x{LONG}"
    sub.mkdir(exist_ok=True)
    for name in ("hf", "base"):
        if not (sub / name).exists():
            (sub / name).symlink_to(run / name)
    return sub


def model_stages(run: Path, names: list[str], size: dict) -> dict:
    """Train each run of `names` and evaluate every exit of it before the next (every stage
    cached), so each finished run is a complete row of the study."""
    out = {}
    for n in names:
        out[n] = {"train": train_stage(run, RUNS[n][0], size, RUNS[n][1], n)}
        out[n].update({task: eval_stage(run, n, task, size=size) for task in TASKS})
    return out


def score(res: dict) -> float:
    """Ranking of a recipe for the second round: the mean draft acceptance at exits 21..27
    minus the last layer's held-out loss excess over 0.90 nats (both targets of the issue)."""
    acc = res["decoding"].get("acceptance", {})
    mean_acc = sum(acc.get(str(e), 0.0) for e in TARGETS["acceptance"]) / len(TARGETS["acceptance"])
    last = res["loss"]["per_exit"][str(EXITS[-1])]["loss"]
    return mean_acc - max(0.0, last - TARGETS["last_loss"])


def long_choice(run: Path, first: dict) -> list[str]:
    """`paper` and the two best recipes by `score`, fixed once chosen (run/long_choice.json)."""
    def go():
        ranked = sorted((n for n in first if n not in ("sft", "soft")),
                        key=lambda n: -score(first[n]))
        return {"runs": ["soft"] + ranked[:LONG_RUNS - 1],
                "scores": {n: score(first[n]) for n in first if n != "sft"}}

    return cached(run / "long_choice.json", "choose the 4x runs", go)["runs"]


def long_runs(run: Path) -> list[str]:
    """The 4x round's runs once chosen (the chosen ones after SFT), else []."""
    path = run / "long_choice.json"
    return [LONG_REFERENCE] + json.loads(path.read_text())["runs"] if path.is_file() else []


def run_study(run: Path, gguf: str | None = None, names: str = "", long: bool = True) -> dict:
    """Run (or resume) the study in `run`; `names` (comma list) keeps only those runs of the
    first round, in that order, `long=False` skips the 4x round. Writes run/study.json and the report."""

    run = Path(run).absolute()
    run.mkdir(parents=True, exist_ok=True)
    convert_stage(run, Path(gguf) if gguf else default_gguf())
    wanted = names.split(",") if names else list(RUNS)
    unknown = [n for n in wanted if n not in RUNS]
    if unknown:
        raise ValueError(f"--models: unknown study run(s) {unknown}; expected some of "
                         f"{list(RUNS)}")
    results = {"size": study_size(), "first": model_stages(run, wanted, study_size()), "long": {}}
    if long and not names:
        long_choice(run, results["first"])  # chosen once, kept in run/long_choice.json
        results["long"] = model_stages(_run_dir(run, True), long_runs(run), study_size(True))
    results["long_runs"] = long_runs(run)
    (run / "study.json").write_text(json.dumps(results, indent=2, default=str))
    log(f"study report: {write_study_report(run, results)}")
    return results


def finished(run: Path) -> dict:
    """The completed stages of a study run dir (for the report without running anything)."""
    out = {"size": study_size(), "first": {}, "long": {}, "long_runs": long_runs(run)}
    for key, sub in (("first", run), ("long", run / f"x{LONG}")):
        for name in RUNS:
            res = {}
            if stage_path(sub, "train", name).is_file():
                res["train"] = json.loads(stage_path(sub, "train", name).read_text())
            for task in TASKS:
                p = stage_path(sub, "eval", name, task)
                if p.is_file():
                    res[task] = json.loads(p.read_text())
            if res:
                out[key][name] = res
    return out
