"""Decoding speed beside its peers, in one run: the weight-bandwidth floor, soft_jax plain
greedy (full model and each exit), self-speculative (per draft exit) and dynamic early exit,
and transformers `generate` (eager, static cache, static cache + torch.compile on GPU, and
its LayerSkip self-speculation `assistant_early_exit=n` at the same draft exits).

    python bench/decode.py                                          # small random model, CPU
    python bench/decode.py --hf DIR --exits 10,15,20,30 --new-tokens 48 --json rows.json
    python bench/decode.py --preset tinyllama-1.1b --dtype bfloat16 [--ckpt CKPT]
    python bench/decode.py --hf DIR --no-transformers --host-loop   # + speculation rounds
                                                                    #   driven from the host

Every row decodes the same prompt(s) with the same dtype, batch 1 and exactly --new-tokens
tokens (eos is ignored on both sides); times include prefill, exclude compilation (one
warm-up per row). Repeats are interleaved: each repeat runs every row once, starting at a
rotating row, and each row keeps its fastest repeat, so load on a shared machine hits every
row alike. The floor row is weight bytes read per token (layers, final norm, head) over the
read bandwidth a jitted reduction reaches in the same run. `--hf DIR` takes any LLaMA HF
folder (a chat prompt via its template when it has a tokenizer); otherwise random weights of
--preset are written to a temporary HF folder so that transformers runs the same weights.

A random model's exits disagree with its last layer far more than a SoFT-trained model's, so
acceptance is low; `--layer-scale 0.02` shrinks the residual updates of the layers after the
first exit and `--head-scale 30` sharpens the head to mimic a model whose exits agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import soft_jax as sj
from soft_jax.cli.flags import comma_ints
from soft_jax.infer.engine import Decoding
from soft_jax.infer.generate import generate
from soft_jax.infer.speculative import speculative_generate
from soft_jax.model.config import PRESETS
from soft_jax.model.exits import head_kernel

SHAPES = {
    "small-random": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=8,
                         num_heads=8, num_kv_heads=4, exits=(2, 4, 6, 8)),
    "tiny-random": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4,
                        num_heads=4, num_kv_heads=2, exits=(1, 2, 3, 4)),
}
CHAT = "What is the capital of France? Answer in one sentence, then name two of its museums."
Runner = Callable[[list[int]], tuple[list[int], dict]]


def benchmark_model(args) -> tuple[sj.LlamaConfig, dict, object | None]:
    """The benchmarked model and the tokenizer saved with an HF folder (else None): an HF
    folder, a checkpoint or random weights of a preset."""
    exits = {"exits": comma_ints(args.exits)} if args.exits else {}
    if args.hf or args.ckpt:
        config, params, tokenizer, _ = sj.load_model(
            args.hf or args.ckpt, args.dtype if args.hf else None, tokenizer=bool(args.hf))
        return config.replace(**exits, eos_token_id=None), params, tokenizer
    shape = {**(SHAPES.get(args.preset) or PRESETS[args.preset]), **exits}
    config = sj.LlamaConfig(**{**shape, "param_dtype": args.dtype, "dtype": args.dtype,
                               "eos_token_id": None, "max_position_embeddings": 2048})
    params = jax.jit(sj.init_params, static_argnums=0)(config, jax.random.PRNGKey(args.seed))
    if args.layer_scale != 1.0:
        first = config.resolved_exits[0]
        for group, name in (("attn", "o_proj"), ("mlp", "down_proj")):
            kernel = params["layers"][group][name]["kernel"]
            params["layers"][group][name]["kernel"] = kernel.at[first:].multiply(args.layer_scale)
    if args.head_scale != 1.0:
        head = "embed" if config.tie_word_embeddings else "lm_head"
        params[head] = jax.tree.map(lambda w: w * args.head_scale, params[head])
    return config, params, None


def weight_bytes(config: sj.LlamaConfig, params: dict) -> int:
    """Bytes of weights one full-model token reads: layers, final norm and the head."""
    head = head_kernel(config, params, config.num_layers)
    return sum(x.nbytes for x in jax.tree.leaves((params["layers"], params["final_norm"]))) + \
        head.size * head.dtype.itemsize


def read_bandwidth(mib: int = 512, passes: int = 5) -> float:
    """Bytes/s of the fastest of `passes` jitted sums over a float32 array of `mib` MiB."""
    x = jnp.ones((mib * 2**18,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best


def prompts_of(args, config, tokenizer) -> list[list[int]]:
    """--prompts prompts: the chat prompt (and numbered variants) via the tokenizer's chat
    template when there is one, else random ids of --prompt-len tokens."""
    if tokenizer is None:
        rng = np.random.default_rng(args.seed)
        return [rng.integers(3, config.vocab_size, args.prompt_len).tolist()
                for _ in range(args.prompts)]
    texts = [args.prompt] + [f"{args.prompt} ({i + 1})" for i in range(1, args.prompts)]
    if tokenizer.chat_template:
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                   add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]) for t in texts]
    return [tokenizer(t)["input_ids"] for t in texts]


def soft_jax_rows(config, params, new_tokens, draft_exits, args) -> list[tuple[dict, Runner]]:
    """(row, runner) for soft_jax greedy (full, each exit), speculative and dynamic decoding."""
    def runner(**kw) -> Runner:
        def run(prompt):
            out = generate(config, params, prompt, new_tokens, **kw)
            return out.tokens[0], out.stats
        return run

    L = config.num_layers
    rows = [({"mode": "greedy", "exit": None}, runner())]
    rows += [({"mode": "greedy", "exit": e}, runner(exit_layer=e))
             for e in config.resolved_exits if e < L]
    rows += [({"mode": "speculative", "exit": n},
              runner(draft_exit=n, draft_tokens=args.draft_tokens)) for n in draft_exits]
    if args.host_loop:
        def host_runner(n: int) -> Runner:
            s = Decoding(new_tokens)
            return lambda prompt: speculative_generate(config, params, prompt, n,
                                                       args.draft_tokens, s, host_loop=True)
        rows += [({"mode": "speculative-host-loop", "exit": n}, host_runner(n))
                 for n in draft_exits]
    rows.append(({"mode": "dynamic", "exit": None}, runner(dynamic=True,
                                                           thresholds=args.thresholds)))
    return [({"system": "soft_jax", **r}, f) for r, f in rows]


def transformers_rows(folder, dtype: str, new_tokens, draft_exits) -> list[tuple[dict, Runner]]:
    """(row, runner) for transformers generate; a row that cannot run here carries a
    'skipped' reason instead of a runner."""
    rows = [({"mode": "eager", "exit": None}, {}),
            ({"mode": "static", "exit": None}, {"cache_implementation": "static"}),
            ({"mode": "static+compile", "exit": None}, {"cache_implementation": "static"})]
    rows += [({"mode": "assistant_early_exit", "exit": n}, {"assistant_early_exit": n})
             for n in draft_exits]
    rows = [({"system": "transformers", **r}, kw) for r, kw in rows]
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return [({**r, "skipped": f"transformers/torch not importable: {e}"}, None)
                for r, _ in rows]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def load():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        model.generation_config.eos_token_id = None  # exactly new_tokens tokens, as soft_jax
        model.generation_config.pad_token_id = 0
        return model.to(device).eval()

    def runner(model, kw) -> Runner:
        def run(prompt):
            ids = torch.tensor([prompt], device=device)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=new_tokens, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            return out[0, len(prompt):].tolist(), {}
        return run

    model, out = load(), []
    for row, kw in rows:
        if row["mode"] != "static+compile":
            out.append((row, runner(model, kw)))
        elif device != "cuda":
            out.append(({**row, "skipped": "torch.compile rows run only on a GPU"}, None))
        else:  # its own copy: compiling forward must not change the other rows
            compiled = load()
            compiled.forward = torch.compile(compiled.forward, mode="reduce-overhead",
                                             fullgraph=True)
            out.append((row, runner(compiled, kw)))
    return out


def measure(rows: list[tuple[dict, Runner]], prompts, repeats: int, floor_bytes: int,
            bandwidth_mib: int) -> list[dict]:
    """Warm every runnable row up, then `repeats` interleaved passes (rotating start); each row
    keeps its fastest pass. Returns the rows with timings, led by the floor row."""
    live = [i for i, (_, run) in enumerate(rows) if run is not None]
    for i in live:
        rows[i][1](prompts[0])  # compilation / first-call costs stay out of the timings
    times: dict[int, list[float]] = {i: [] for i in live}
    best: dict[int, list] = {}
    bandwidth = 0.0
    for rep in range(repeats):
        bandwidth = max(bandwidth, read_bandwidth(bandwidth_mib))
        for i in live[rep % len(live):] + live[:rep % len(live)]:
            t0 = time.perf_counter()
            outs = [rows[i][1](p) for p in prompts]
            times[i].append(time.perf_counter() - t0)
            if times[i][-1] == min(times[i]):
                best[i] = outs
    n = sum(len(t) for t, _ in best[live[0]])
    floor = {"system": "soft_jax", "mode": "floor", "exit": None,
             "ms_per_token": 1000 * floor_bytes / bandwidth,
             "tokens_per_s": bandwidth / floor_bytes, "weight_bytes": floor_bytes,
             "read_gb_per_s": bandwidth / 1e9, "identical_to_greedy": None}
    reference = [t for t, _ in best[live[0]]]  # soft_jax greedy, full model
    out = [floor]
    for i, (row, _) in enumerate(rows):
        if i not in live:
            out.append(dict(row))
            continue
        toks = [t for t, _ in best[i]]
        agg = {k: sum(s.get(k, 0) for _, s in best[i]) for k in ("drafted", "accepted")}
        exits = [e for _, s in best[i] for e in s.get("exits", [])]
        ms = 1000 * min(times[i]) / n
        out.append({**row, "ms_per_token": ms, "tokens_per_s": 1000 / ms,
                    "median_ms_per_token": 1000 * statistics.median(times[i]) / n,
                    "tokens": sum(len(t) for t in toks),
                    "acceptance_rate": agg["accepted"] / agg["drafted"] if agg["drafted"]
                    else None, "mean_exit": float(np.mean(exits)) if exits else None,
                    "identical_to_greedy": toks == reference})
    ref = {(r["system"], r["mode"], r["exit"]): r.get("ms_per_token") for r in out}
    for r in out:
        for name, key in (("speedup_vs_transformers_eager", ("transformers", "eager", None)),
                          ("speedup_vs_greedy", ("soft_jax", "greedy", None))):
            r[name] = ref[key] / r["ms_per_token"] if ref.get(key) and "skipped" not in r \
                else None
    return out


def print_table(rows: list[dict]) -> None:
    """The rows as a fixed-width table."""
    head = (f"{'system':<13}{'mode':<21}{'exit':>5}{'ms/tok':>9}{'tok/s':>8}{'x eager':>8}"
            f"{'x greedy':>9}{'accept':>7}{'m.exit':>7}{'=greedy':>8}")
    print(head + "\n" + "-" * len(head))
    fmt = lambda v, f: " " * len(format(0.0, f)) if v is None else format(v, f)  # noqa: E731
    times = lambda r, k: " " if r[f"speedup_vs_{k}"] is None else "x"  # noqa: E731
    for r in rows:
        cells = f"{r['system']:<13}{r['mode']:<21}{'' if r['exit'] is None else r['exit']:>5}"
        if "skipped" in r:
            print(f"{cells}  skipped: {r['skipped']}")
            continue
        same = r["identical_to_greedy"]
        print(cells + f"{r['ms_per_token']:>9.2f}{fmt(r.get('tokens_per_s'), '>8.1f')}"
              f"{fmt(r['speedup_vs_transformers_eager'], '>7.2f')}{times(r, 'transformers_eager')}"
              f"{fmt(r['speedup_vs_greedy'], '>8.2f')}{times(r, 'greedy')}"
              f"{fmt(r.get('acceptance_rate'), '>7.0%')}"
              f"{fmt(r.get('mean_exit'), '>7.1f')}{'' if same is None else str(same):>8}")
    print("floor: weight bytes read per token / read bandwidth of a jitted reduction, this "
          "run; x eager / x greedy: speedup over transformers eager / soft_jax full greedy; "
          "accept: drafted tokens accepted; =greedy: tokens equal soft_jax full greedy")


def main(argv=None) -> list[dict]:
    """Run the benchmark; prints the table and returns (and with --json writes) the rows."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-random",
                   help=f"{' or '.join(SHAPES)} or a soft_jax preset name (random weights)")
    p.add_argument("--hf", default=None, help="benchmark a Hugging Face LLaMA folder instead")
    p.add_argument("--ckpt", default=None, help="benchmark a soft_jax checkpoint instead")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--exits", default=None, help="override the exits, e.g. 8,12,16")
    p.add_argument("--layer-scale", type=float, default=1.0,
                   help="random weights: scale the updates of layers after the first exit")
    p.add_argument("--head-scale", type=float, default=1.0, help="random weights: sharpen")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--prompt", default=CHAT, help="chat prompt text (models with a tokenizer)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length otherwise")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--draft-exits", default=None, help="comma-separated (default: every exit)")
    p.add_argument("--draft-tokens", type=int, default=None, help="fixed K (default adaptive)")
    p.add_argument("--thresholds", type=float, default=None,
                   help="one dynamic threshold for all exits (default: the paper's, mapped)")
    p.add_argument("--no-transformers", action="store_true", help="soft_jax rows only")
    p.add_argument("--host-loop", action="store_true",
                   help="add speculation driven from the host, one call per round")
    p.add_argument("--bandwidth-mib", type=int, default=512, help="floor: bytes summed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)

    config, params, tokenizer = benchmark_model(args)
    L = config.num_layers
    early = [e for e in config.resolved_exits if e < L]
    drafts = list(comma_ints(args.draft_exits) or early)
    prompts = prompts_of(args, config, tokenizer)
    print(f"model: {L} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, exits "
          f"{config.resolved_exits}, {args.dtype}, batch 1, {len(prompts)} prompt(s) of "
          f"{[len(q) for q in prompts]} tokens, {args.new_tokens} new tokens, best of "
          f"{args.repeats} interleaved, jax {jax.__version__} on {jax.default_backend()}")
    rows = soft_jax_rows(config, params, args.new_tokens, drafts, args)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_transformers:
            folder = args.hf or sj.save_hf(config, params, Path(tmp) / "hf",
                                                   dtype=args.dtype)
            rows += transformers_rows(folder, args.dtype, args.new_tokens, drafts)
        result = measure(rows, prompts, args.repeats, weight_bytes(config, params),
                         args.bandwidth_mib)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps([r for r in result if "skipped" not in r],
                                              indent=1))
    return result


if __name__ == "__main__":
    main()
