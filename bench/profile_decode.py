"""Where decoding time goes: a jax.profiler trace of plain greedy tokens and of self-speculative
rounds, with the XLA ops' time grouped into a few kinds (docs/profile.md reads it).

    python bench/profile_decode.py --hf DIR [--exits 10,15,20,30] [--draft-exit 15]

Both decodings are traced after a warm-up call (no compilation inside the trace). The op
times come from the CPU thunk events of the trace (both XLA worker threads together), inside
the window of each decoding; per token (greedy) and per round (speculative) they are the
window's share, so read the percentages rather than the absolute times (tracing slows ops).
"""

from __future__ import annotations

import argparse
import collections
import glob
import tempfile

import jax

import soft_jax as sj
from soft_jax.cli.flags import comma_ints
from soft_jax.infer.generate import generate

CONTROL = ("while", "cond", "conditional", "ThunkExecutor", "call")


def kind(name: str) -> str | None:
    """The group of an XLA op name, or None for control flow (its time is in its body ops)."""
    if name.startswith(CONTROL):
        return None
    if name.startswith("dynamic-slice_bitcast_fusion"):
        return "weight copy: a layer's weights sliced out of the stack"
    if name.startswith(("dot", "ynn_fusion")):
        return "matmul (dot)"
    if "copy" in name or "dynamic-slice" in name or "dynamic-update-slice" in name:
        return "KV cache slices / updates, layout copies"
    return "other fusions (norms, RoPE, attention, softmax, argmax)"


def op_times(xplane: str, window: str) -> tuple[float, int, collections.Counter, collections.Counter]:
    """(window wall ns, windows, ns per kind, ns per op) of the ops inside TraceAnnotation
    `window` on every CPU thread of the trace."""
    plane = next(p for p in jax.profiler.ProfileData.from_file(xplane).planes
                 if p.name == "/host:CPU")
    lines = {line.name: list(line.events) for line in plane.lines}
    spans = [(e.start_ns, e.start_ns + e.duration_ns) for e in lines["python"]
             if e.name == window]
    kinds, ops = collections.Counter(), collections.Counter()
    for name, events in lines.items():
        for e in events if name != "python" else ():
            k = kind(e.name)
            if k and any(a <= e.start_ns < b for a, b in spans):
                kinds[k] += e.duration_ns
                ops[e.name] += e.duration_ns
    return sum(b - a for a, b in spans), len(spans), kinds, ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face LLaMA folder")
    p.add_argument("--exits", default="10,15,20,30")
    p.add_argument("--draft-exit", type=int, default=15)
    p.add_argument("--draft-tokens", type=int, default=4, help="fixed K of the traced rounds")
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    config, params = sj.load_hf(args.hf, "float32")
    config = config.replace(eos_token_id=None,
                            exits=comma_ints(args.exits))
    prompt = list(range(100, 149))
    runs = {"greedy": dict(), "speculative": dict(draft_exit=args.draft_exit,
                                                  draft_tokens=args.draft_tokens)}
    for kw in runs.values():
        generate(config, params, prompt, args.tokens, **kw)  # compile outside the trace
    with tempfile.TemporaryDirectory() as tmp:
        stats = {}
        with jax.profiler.trace(tmp):
            for name, kw in runs.items():
                with jax.profiler.TraceAnnotation(name):
                    stats[name] = generate(config, params, prompt, args.tokens, **kw).stats
        xplane = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
        for name in runs:
            wall, _, kinds, ops = op_times(xplane, name)
            units = stats[name].get("rounds", args.tokens)
            unit = "round" if name == "speculative" else "token"
            busy = sum(kinds.values())
            print(f"== {name}: {units} {unit}s, {wall / 1e6 / units:.1f} ms wall per {unit} "
                  f"under the tracer; op time {busy / 1e6 / units:.1f} ms per {unit}"
                  + (f"; accepted {stats[name]['accepted']}/{stats[name]['drafted']}"
                     if unit == "round" else ""))
            for k, t in kinds.most_common():
                print(f"   {100 * t / busy:5.1f}%  {k}")
            print("   top ops: " + ", ".join(f"{n} {100 * t / busy:.1f}%"
                                             for n, t in ops.most_common(8)))


if __name__ == "__main__":
    main()
