"""The eval config schema (ml_collections): every field with its default.

Config files in configs/eval/ start from `default_config()` and override; `validate` rejects
unknown fields, unknown tasks and bad values, naming the field.
"""

from __future__ import annotations

import ml_collections

from soft_jax.train.run_config import unknown_fields

TASKS = ("loss", "gsm8k", "triviaqa", "generate", "sortedness", "pairwise", "decoding")


def default_config() -> ml_collections.ConfigDict:
    """All eval fields with defaults (the paper's generation limits)."""
    c = ml_collections.ConfigDict()
    c.name = "SoFT"  # label of the model in tables and figures
    c.ckpt = ""  # soft_jax checkpoint, Orbax manager dir or training work dir
    c.hf = ""  # or a Hugging Face folder (Llama, Mistral, Qwen2, Qwen3) (exactly one of ckpt / hf)
    c.tokenizer = ""  # "" = saved with the checkpoint / inside the HF folder
    c.dtype = "float32"  # parameter dtype when loading a HF folder
    c.allow_unverified = False  # load checkpoint steps without an integrity record
    c.exits = ()  # 1-based layer counts; empty = the model config's exits (with the last layer)
    c.out_dir = "runs/eval"
    c.tasks = ("loss",)  # any of TASKS
    c.batch_size = 8
    c.seed = 0
    c.max_prompt_tokens = 2048  # longer prompts keep their last tokens
    c.template = "auto"  # chat | plain | auto (= chat when the tokenizer has a chat template):
    #                      prompts and loss data formatted as in training (data.template)

    c.loss = ml_collections.ConfigDict()
    c.loss.source = "gsm8k_demo:heldout"  # anything data.load_rows reads
    c.loss.split = "test"
    c.loss.subset = ""
    c.loss.format = "gsm8k"  # alpaca | gsm8k | triviaqa | chat | sharegpt | text
    c.loss.seq_len = 512
    c.loss.max_examples = 0  # 0 = all

    c.gsm8k = ml_collections.ConfigDict()
    c.gsm8k.source = "gsm8k_demo:heldout"
    c.gsm8k.split = "test"
    c.gsm8k.subset = ""
    c.gsm8k.max_examples = 0
    c.gsm8k.shots = (0, 8)  # 0 = zero-shot; k > 0 = k worked examples before the question
    c.gsm8k.few_shot_source = "gsm8k_demo:train"  # exemplars: its first k rows
    c.gsm8k.max_new_tokens = 256

    c.triviaqa = ml_collections.ConfigDict()
    c.triviaqa.source = "trivia_qa"  # hub name (network) or a local json/jsonl/parquet file
    c.triviaqa.subset = "rc.nocontext"
    c.triviaqa.split = "validation"
    c.triviaqa.max_examples = 0
    c.triviaqa.shots = 0
    c.triviaqa.few_shot_source = ""  # "" = none; exemplars are its first k rows
    c.triviaqa.max_new_tokens = 50  # the paper's limit

    c.generate = ml_collections.ConfigDict()
    c.generate.source = "gsm8k_demo:heldout"  # the instruction set (PandaLM's validation set
    c.generate.split = "test"  # in the paper: an alpaca-format json of 170 instructions)
    c.generate.subset = ""
    c.generate.format = "gsm8k"
    c.generate.max_examples = 0
    c.generate.max_new_tokens = 256  # the paper's limit for PandaLM

    c.second = ml_collections.ConfigDict()  # the other model for pairwise / sortedness
    c.second.name = "SFT"
    c.second.ckpt = ""
    c.second.hf = ""
    c.second.tokenizer = ""
    c.second.exits = ()  # empty = the first model's exits (that exist in the second model)

    c.pairwise = ml_collections.ConfigDict()
    c.pairwise.judge = "rouge-l"  # "rouge-l" (offline, reference-based) | "hf:FOLDER" (PandaLM)
    c.pairwise.judge_tokenizer = ""  # "" = the judge folder's tokenizer
    c.pairwise.judge_decoding = "beam"  # PandaLM's: 4 beams, repetition penalty 1.2 | greedy
    c.pairwise.judge_max_new_tokens = 512  # PandaLM's limit (the verdict is the first line)
    c.pairwise.judge_batch_size = 4
    c.pairwise.a_generations = ""  # generations.jsonl of model A; "" = generate now
    c.pairwise.b_generations = ""  # of model B; "" = generate with `second` (or model A)

    c.sortedness = ml_collections.ConfigDict()
    c.sortedness.source = "gsm8k_demo:heldout"
    c.sortedness.split = "test"
    c.sortedness.subset = ""
    c.sortedness.format = "gsm8k"
    c.sortedness.max_examples = 170  # the paper's sample count
    c.sortedness.positions = 20  # response positions 0..19
    c.sortedness.response = "reference"  # reference (the data's answer) | generated (greedy,
    #                                        model A's last layer); the same tokens for all

    c.decoding = ml_collections.ConfigDict()  # the speed table (soft_jax/eval/decoding.py)
    c.decoding.source = "gsm8k_demo:heldout"  # prompts: gsm8k | triviaqa | instruction formats
    c.decoding.split = "test"
    c.decoding.subset = ""
    c.decoding.format = "gsm8k"  # quality: gsm8k accuracy, triviaqa exact match, else ROUGE-L
    c.decoding.max_examples = 2  # greedy batch 1: every prompt is one timed run per row
    c.decoding.max_new_tokens = 32
    c.decoding.draft_exits = ()  # empty = every exit but the last
    c.decoding.sweep = (0.5, 0.7, 0.9)  # uniform dynamic-exit thresholds besides the paper's
    return c




def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first bad field (unknown fields and tasks included)."""
    unknown = unknown_fields(cfg, default_config())
    if unknown:
        raise ValueError(f"unknown eval config field(s) {unknown}; see soft_jax/eval/config.py")
    tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"config.tasks: unknown task(s) {bad or '(none given)'}; expected "
                         f"some of {list(TASKS)}")
    if bool(cfg.ckpt) == bool(cfg.hf):
        raise ValueError("config.ckpt / config.hf: set exactly one (a soft_jax checkpoint or "
                         "work dir, or a Hugging Face folder)")
    if cfg.second.ckpt and cfg.second.hf:
        raise ValueError("config.second.ckpt / config.second.hf: set at most one")
    for name in ("batch_size", "max_prompt_tokens", "gsm8k.max_new_tokens",
                 "triviaqa.max_new_tokens", "generate.max_new_tokens", "loss.seq_len",
                 "decoding.max_new_tokens",
                 "sortedness.positions", "pairwise.judge_max_new_tokens",
                 "pairwise.judge_batch_size"):
        v = cfg
        for part in name.split("."):
            v = v[part]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config.{name} must be a positive int, got {v!r}")
    for name in ("loss", "gsm8k", "triviaqa", "generate", "sortedness", "decoding"):
        v = cfg[name].max_examples
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"config.{name}.max_examples must be an int >= 0 (0 = all), "
                             f"got {v!r}")
    shots = cfg.gsm8k.shots
    shots = [shots] if isinstance(shots, int) else list(shots)
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in shots):
        raise ValueError(f"config.gsm8k.shots must be ints >= 0 (0 = zero-shot), got {shots!r}")
    if not isinstance(cfg.triviaqa.shots, int) or cfg.triviaqa.shots < 0:
        raise ValueError(f"config.triviaqa.shots must be an int >= 0, got {cfg.triviaqa.shots!r}")
    if cfg.triviaqa.shots and not cfg.triviaqa.few_shot_source:
        raise ValueError("config.triviaqa.shots > 0 needs config.triviaqa.few_shot_source")
    if cfg.sortedness.response not in ("reference", "generated"):
        raise ValueError(f"config.sortedness.response={cfg.sortedness.response!r}; expected "
                         "'reference' or 'generated'")
    if cfg.pairwise.judge_decoding not in ("beam", "greedy"):
        raise ValueError(f"config.pairwise.judge_decoding={cfg.pairwise.judge_decoding!r}; "
                         "expected 'beam' (PandaLM's) or 'greedy'")
    if any(not 0 < float(t) <= 1 for t in cfg.decoding.sweep):
        raise ValueError(f"config.decoding.sweep must hold thresholds in (0, 1], got "
                         f"{tuple(cfg.decoding.sweep)}")
    if cfg.template not in ("auto", "chat", "plain"):
        raise ValueError(f"config.template={cfg.template!r}; expected auto, chat or plain")
    judge = cfg.pairwise.judge
    if judge not in ("rouge-l",) and not judge.startswith("hf:"):
        raise ValueError(f"config.pairwise.judge={judge!r}; expected 'rouge-l' or 'hf:FOLDER'")
