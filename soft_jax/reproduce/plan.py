"""What the reproduction runs and where each result lives: sizes, exits, models, stages."""

from __future__ import annotations

from pathlib import Path

SIZES = {  # the CPU size fits ~45 min on an idle 2-core CPU; --full is meant for one GPU
    "cpu": dict(steps=30, batch_size=2, seq_len=512, lr=3e-4, warmup=3, loss_examples=50,
                gen_examples=16, max_new_tokens=128, sortedness_examples=32, positions=20,
                decode_prompts=2, decode_new_tokens=48),
    "full": dict(steps=160, batch_size=8, seq_len=512, lr=3e-4, warmup=5, loss_examples=200,
                 gen_examples=200, max_new_tokens=256, sortedness_examples=170, positions=20,
                 decode_prompts=20, decode_new_tokens=128),
}
EXITS = tuple(range(9, 31, 3))  # 30% depth every 10%, as the paper's 12, 16, ..., 40 of 40
RUNS = ("sft", "soft", "ict")
MODELS = {"base": "base", "sft": "SFT", "soft": "SoFT", "ict": "ICT"}

# Cheapest evidence first: the headline loss comparison, then decoding and sorted-ness, the
# generations, and the ICT baseline (a third training run) last.
STAGES = (("train", "sft"), ("train", "soft"), ("eval", "base", "loss"), ("eval", "sft", "loss"),
          ("eval", "soft", "loss"), ("decode", "soft"), ("decode", "sft"),
          ("eval", "soft", "sortedness", "sft"), ("eval", "base", "sortedness"),
          ("eval", "base", "gsm8k"), ("eval", "sft", "gsm8k"), ("eval", "soft", "gsm8k"),
          ("train", "ict"), ("eval", "ict", "loss"), ("eval", "ict", "gsm8k"),
          ("eval", "ict", "sortedness"))


def stage_path(run: Path, kind: str, name: str, task: str = "") -> Path:
    """Where a stage's result JSON lives (its presence marks the stage complete)."""
    return {"train": run / name / "done.json", "decode": run / "decode" / f"{name}.json",
            "eval": run / "eval" / name / f"{task}.json"}[kind]

# the recipe study: run name -> (mode, recipe); "soft" is the paper's equal mean
STUDY_RUNS = {"sft": ("sft", "paper"), "soft": ("soft", "paper"),
              "last_boost": ("soft", "last_boost"), "distill": ("soft", "distill"),
              "layerskip": ("soft", "layerskip"), "depth": ("soft", "depth"),
              "last_boost_distill": ("soft", "last_boost_distill")}
STUDY_TASKS = ("loss", "sortedness", "decoding")
