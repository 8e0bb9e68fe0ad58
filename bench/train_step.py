"""One full training step (loss + grads + AdamW, donated state), SFT vs SoFT, in one run.

    python bench/train_step.py --preset small --batch 1 --seq 512            # CPU
    python bench/train_step.py --preset tinyllama-1.1b --batch 8 --seq 2048 \\
        --dtype bfloat16                                                    # GPU (H100/H200)

Variants (each in its own subprocess, so peak memory and compile caches are per variant):
  sft/plain, sft/chunked    exits = (L,): plain and chunked loss
  soft/plain, soft/chunked  exits = the preset's (or --exits): plain and chunked loss
  (--variants adds e.g. soft/chunked_recompute)

Printed per variant: step time (mean of --steps after --warmup, one device sync at the
end), tokens/s, model FLOPs per token, MFU, peak memory, compile time (lower + compile). Then
the SoFT/SFT ratios (time, memory) and the FLOP-theoretic SoFT/SFT ratio.

FLOPs per token (training, forward + backward): soft_jax/flops.py's
    6*N + 6*L*T*D + 6*D*V*(E - 1)
(N = matmul parameters of one SFT forward, T = sequence length). MFU = FLOPs/token x tokens/s
/ peak; peak = --peak-tflops, else 989 TFLOP/s for H100/H200 with bf16 (dense), else (CPU)
the best of 5 timed 2048^3 matmuls in the compute dtype, measured once (first variant) and
used for every row. On a shared CPU that figure moves with the load: read CPU MFU loosely.

Peak memory: the device's `peak_bytes_in_use` where the backend reports it (GPU); else
XLA's compile-time estimate, argument + output + temp - aliased (donated) bytes.
Only jax, numpy, optax, ml_collections and soft_jax are imported (no datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # `python bench/train_step.py` from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_VARIANTS = ("sft/plain", "sft/chunked", "soft/plain", "soft/chunked")
H100_BF16_PEAK = 989e12


# ------------------------------------------------------------------------- one variant
def _peak_flops(args, jax, jnp) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, args.peak_desc or f"--peak-tflops {args.peak_tflops}"
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "")
    if dev.platform == "gpu" and any(k in kind for k in ("H100", "H200")) and \
            args.dtype in ("bfloat16", "float16"):
        return H100_BF16_PEAK, f"{kind} dense bf16 989 TFLOP/s"
    n = 2048
    dt = jnp.dtype(args.dtype)
    a = jnp.ones((n, n), dt)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):  # best of 5: the machine may be shared
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best, f"best measured {n}^3 {args.dtype} matmul on {kind or dev.platform}"


def run_variant(args, variant: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from soft_jax.train.chunked_loss import default_chunk_tokens
    from soft_jax.cli.flags import comma_ints
    from soft_jax.model.config import preset
    from soft_jax.train.flops import flops_per_token, matmul_params
    from soft_jax.model.layers import attention_impl
    from soft_jax.train.loss import loss_fn, resolve_loss_impl
    from soft_jax.model.transformer import init_params
    from soft_jax.train.modes import train_exits

    kind, impl = variant.split("/")
    overrides = dict(dtype=args.dtype, param_dtype=args.param_dtype, remat_policy=args.remat)
    if args.exits:
        overrides["exits"] = comma_ints(args.exits)
    if args.layers:
        overrides["num_layers"] = args.layers
        overrides.setdefault("exits", None)
    config = preset(args.preset, **overrides)
    exits = train_exits(config, kind)
    resolved = resolve_loss_impl(impl, len(exits), args.batch * args.seq, args.chunk_tokens,
                                 config.vocab_size)
    chunk = min(args.chunk_tokens or default_chunk_tokens(config.vocab_size),
                args.batch * args.seq)

    opt = optax.adamw(args.lr, weight_decay=0.1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}

    def train_step(params, opt_state, batch):
        def loss(p):
            return loss_fn(config, p, batch, exits, z_loss=args.z_loss, impl=impl,
                           chunk_tokens=args.chunk_tokens)
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    opt_state = jax.jit(opt.init)(params)
    step = jax.jit(train_step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    est = None
    if ma is not None:
        est = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)

    for _ in range(args.warmup):
        params, opt_state, value = compiled(params, opt_state, batch)
    jax.block_until_ready((params, opt_state))
    t0 = time.perf_counter()
    for _ in range(args.steps):  # no host sync inside the loop
        params, opt_state, value = compiled(params, opt_state, batch)
    jax.block_until_ready((params, opt_state, value))
    step_s = (time.perf_counter() - t0) / args.steps

    stats = jax.devices()[0].memory_stats() or {}
    peak_dev = stats.get("peak_bytes_in_use")
    peak, peak_src = (peak_dev, "device") if peak_dev else (est, "xla estimate")
    tokens = args.batch * args.seq
    fpt = flops_per_token(config, args.seq, len(exits))
    peak_flops, peak_desc = _peak_flops(args, jax, jnp)
    return dict(variant=variant, impl=resolved, exits=list(exits), step_s=step_s, chunk=chunk,
                attention=attention_impl(config, False, config.compute_dtype),
                tokens_per_s=tokens / step_s, flops_per_token=fpt,
                mfu=fpt * tokens / step_s / peak_flops, peak_bytes=peak, peak_source=peak_src,
                xla_estimate_bytes=est, xla_temp_bytes=ma.temp_size_in_bytes if ma else None,
                compile_s=compile_s, loss=float(value), peak_flops=peak_flops,
                peak_desc=peak_desc, n_params=sum(x.size for x in jax.tree.leaves(params)),
                matmul_params=matmul_params(config),
                versions=dict(jax=jax.__version__, optax=optax.__version__,
                              backend=jax.default_backend(),
                              device=getattr(jax.devices()[0], "device_kind", "")))


# -------------------------------------------------------------------------- reporting
def _gib(b):
    return "n/a" if b is None else f"{b / 2 ** 30:.3f}"


def report(args, rows: dict[str, dict]) -> str:
    lines = []
    any_row = next(iter(rows.values()))
    v = any_row["versions"]
    lines.append(f"preset={args.preset} batch={args.batch} seq={args.seq} dtype={args.dtype} "
                 f"param_dtype={args.param_dtype} remat={args.remat} "
                 f"chunk_tokens={args.chunk_tokens or 'default'} steps={args.steps} "
                 f"(+{args.warmup} warmup) AdamW")
    lines.append(f"jax {v['jax']}, optax {v['optax']}, backend {v['backend']} "
                 f"({v['device']}); attention {any_row['attention']}; chunked loss: "
                 f"{any_row['chunk']} tokens/chunk; MFU peak: {any_row['peak_desc']} = "
                 f"{any_row['peak_flops'] / 1e12:.2f} TFLOP/s; memory: "
                 f"{any_row['peak_source']}")
    lines.append("")
    hdr = (f"| {'variant':<22} | exits | step s | tokens/s | GFLOP/token | MFU | "
           f"peak GiB | XLA temp GiB | compile s | loss |")
    lines.append(hdr)
    lines.append("|" + "|".join("---" for _ in range(10)) + "|")
    for name, r in rows.items():
        label = f"{name} ({r['impl']})" if r["impl"] != name.split("/")[1] else name
        lines.append(f"| {label:<22} | {len(r['exits'])} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['flops_per_token'] / 1e9:.3f} | "
                     f"{100 * r['mfu']:.1f}% | {_gib(r['peak_bytes'])} | "
                     f"{_gib(r['xla_temp_bytes'])} | {r['compile_s']:.1f} | {r['loss']:.4f} |")
    sft = {k.split("/")[1]: r for k, r in rows.items() if k.startswith("sft/")}
    soft = {k.split("/")[1]: r for k, r in rows.items() if k.startswith("soft/")}
    if sft and soft:
        s0 = next(iter(sft.values()))
        f0 = next(iter(soft.values()))
        theo = f0["flops_per_token"] / s0["flops_per_token"]
        lines.append("")
        lines.append(f"FLOP-theoretic SoFT/SFT = {f0['flops_per_token'] / 1e9:.4f} / "
                     f"{s0['flops_per_token'] / 1e9:.4f} = {theo:.3f} "
                     f"(N = {s0['matmul_params'] / 1e6:.2f}M matmul params)")
        lines.append("")
        lines.append("| SoFT loss | vs SFT loss | time ratio | time / FLOP ratio | "
                     "memory ratio |")
        lines.append("|---|---|---|---|---|")
        for fi, fr in soft.items():
            for si, sr in sft.items():
                t = fr["step_s"] / sr["step_s"]
                mem = (fr["peak_bytes"] / sr["peak_bytes"]
                       if fr["peak_bytes"] and sr["peak_bytes"] else float("nan"))
                lines.append(f"| {fi} | {si} | {t:.3f} | {t / theo:.3f} | {mem:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Run the variants (one subprocess each unless --in-process) and print the report."""
    from soft_jax.model.config import REMAT_POLICIES

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="float32", help="compute dtype")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--layers", type=int, default=None, help="override num_layers")
    p.add_argument("--exits", default=None, help="comma-separated exits (default: preset's)")
    p.add_argument("--remat", default="none", help=" | ".join(REMAT_POLICIES))
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--z-loss", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--in-process", action="store_true",
                   help="run variants in this process (peak device memory then accumulates)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peak-desc", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._one:  # child: one variant, JSON on the last stdout line
        print("RESULT " + json.dumps(run_variant(args, args._one)), flush=True)
        return

    rows = {}
    child = list(argv if argv is not None else sys.argv[1:])
    for variant in args.variants.split(","):
        print(f"# running {variant} ...", file=sys.stderr, flush=True)
        if args.in_process:
            rows[variant] = run_variant(args, variant)
            continue
        peak = []
        if rows and not args.peak_tflops:  # every row against the first child's peak
            first = next(iter(rows.values()))
            peak = ["--peak-tflops", repr(first["peak_flops"] / 1e12),
                    "--peak-desc", first["peak_desc"]]
        cmd = [sys.executable, os.path.abspath(__file__), *child, *peak, "--_one", variant]
        out = subprocess.run(cmd, capture_output=True, text=True)
        res = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not res:
            sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
            raise SystemExit(f"variant {variant} failed (exit {out.returncode})")
        rows[variant] = json.loads(res[-1][len("RESULT "):])
    text = report(args, rows)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "report": text}, f, indent=1)


if __name__ == "__main__":
    main()
