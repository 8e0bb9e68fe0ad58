"""Compile time of the training step (loss + grads) vs depth: the scanned stack should be flat.

    python bench/compile_time.py [--layers 4,32] [--exits-every 4] \
        [--hidden 256 --mlp 688 --seq 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

if __package__ in (None, ""):  # `python bench/compile_time.py` from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import soft_jax as sj  # noqa: E402
from soft_jax.train.loss import loss_fn  # noqa: E402


def compile_seconds(config: sj.LlamaConfig, batch: dict) -> float:
    """Seconds to lower + compile one value_and_grad step for `config` (params abstract)."""
    params = jax.eval_shape(lambda: sj.init_params(config, jax.random.PRNGKey(0)))
    step = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(config, p, b), has_aux=True))
    t0 = time.perf_counter()
    step.lower(params, batch).compile()
    return time.perf_counter() - t0


def main(argv=None) -> list[tuple[int, int, bool, float]]:
    """Print (and return) layers, exits, scanned?, compile seconds for each depth."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", default="4,32")
    p.add_argument("--exits-every", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--mlp", type=int, default=688, help="intermediate (SwiGLU) size")
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # time compiling, not a cache read
    ids = np.zeros((2, args.seq), np.int32)
    batch = {"input_ids": ids, "targets": ids, "loss_mask": np.ones_like(ids)}
    rows = []
    for n in (int(x) for x in args.layers.split(",")):
        exits = tuple(range(args.exits_every, n + 1, args.exits_every))
        base = sj.preset("tiny", num_layers=n, hidden_size=args.hidden,
                         intermediate_size=args.mlp, num_heads=4, num_kv_heads=4, exits=exits)
        for scan in (True, False):
            rows.append((n, len(base.resolved_exits), scan,
                         compile_seconds(base.replace(scan_layers=scan), batch)))
    first = {s: t for n, _, s, t in rows if n == rows[0][0]}
    print(f"{'layers':>6} {'exits':>5} {'stack':>9} {'compile s':>10} {'vs first':>9}")
    for n, e, s, t in rows:
        print(f"{n:>6} {e:>5} {'scanned' if s else 'unrolled':>9} {t:>10.2f} {t / first[s]:>8.2f}x")
    return rows


if __name__ == "__main__":
    main()
