"""The TPU compiler's figures for docs/tpu.md: LLaMA-2 7B / 13B / 70B, Llama-3.1-8B and
Qwen3-8B x TPU slices x SFT / SoFT / ICT, the paper recipe's `--fit` flags per slice, the
planner-comparison grid and the decoding programs.

    nohup .venv/bin/python bench/tpu_compile.py > bench_tpu.log 2>&1 &
    .venv/bin/python bench/tpu_compile.py --only fit-13b   # one stage group

Every job is one `soft-jax compile` subprocess (its own memory and caches); its
rows are added to --rows (default docs/tpu_rows.json) as soon as it finishes, and a job
whose result is already there is skipped, so a later run resumes where this one stopped.
`--report` prints docs/tpu.md's tables from whatever rows exist.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = "configs/llama2_13b_alpaca_soft.py"
MODELS = {  # 8 exits each
    "llama2-13b": (12, 16, 20, 24, 28, 32, 36, 40),
    "llama2-7b": (4, 8, 12, 16, 20, 24, 28, 32),
    "llama3.1-8b": (4, 8, 12, 16, 20, 24, 28, 32),
    "llama2-70b": (24, 32, 40, 48, 56, 64, 72, 80),
    "qwen3-8b": (11, 14, 18, 22, 25, 29, 32, 36),  # its preset's: from 30% depth, every 10%
}
TABLE_TOPOLOGIES = ("v5e-32", "v4-64", "v5p-64", "v6e-64", "v5e-256")
PLANNER_POLICIES = ("save_dots", "save_qkv_out", "full")
BATCH = 32  # the paper's rows per step
MARKER = "<!-- tables: .venv/bin/python bench/tpu_compile.py --report --write docs/tpu.md -->"


def chips(topology: str) -> int:
    """Chips of a slice name (v4 / v5p names count two cores per chip)."""
    family, count = topology.split("-")
    return int(count) // (2 if family in ("v4", "v5p") else 1)


def mesh_flags(topology: str) -> list[str]:
    """ZeRO-3 over the batch's rows; the chips beyond them split heads and MLP (tensor)."""
    n = chips(topology)
    tensor = max(1, n // BATCH)
    return ["--config.mesh.data=1", "--config.mesh.fsdp=-1", f"--config.mesh.tensor={tensor}"]


def model_flags(model: str, mode: str) -> list[str]:
    """The paper recipe on `model` (a preset's random-init shape; ICT's SFT model is the
    paper's path, not present here, so the preset gives its shape too)."""
    init = "runs/llama2-13b-alpaca-sft" if mode == "ict" else ""
    return [f"--config.model.preset={model}", f"--config.model.init_from={init}",
            "--config.exits=" + ",".join(map(str, MODELS[model])), f"--config.mode={mode}"]


def row_key(model, topology, mode, remat, accum) -> str:
    """The store's key of one compiled step."""
    return f"{model}|{topology}|{mode}|{remat}|{accum}"


def key_of(row: dict, model: str) -> str:
    """The store's key of a compiled row."""
    return row_key(model, row["topology"], row["mode"], row["remat"], row["grad_accum"])


class Store:
    """Rows and fits on disk, rewritten (atomically) after every job."""

    def __init__(self, path: Path):
        self.path = path
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.rows: dict = data.get("rows", {})
        self.fits: dict = data.get("fits", {})
        self.decode: dict = data.get("decode", {})
        self.versions: dict = data.get("versions") or versions()

    def save(self) -> None:
        """Write the store (a temporary file, then renamed)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"versions": self.versions, "rows": self.rows,
                                   "fits": self.fits, "decode": self.decode}, indent=1))
        tmp.replace(self.path)


def versions() -> dict:
    """The jax and libtpu versions the figures come from."""
    from importlib.metadata import version

    return {"jax": version("jax"), "libtpu": version("libtpu")}


def compile_cli(args: list[str]) -> tuple[int, list[dict], str]:
    """(exit status, JSON rows, output) of one `soft-jax compile` run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        p = subprocess.run([sys.executable, "-m", "soft_jax", "compile", "--config", PAPER,
                            *args, "--json", str(out)], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        rows = json.loads(out.read_text()) if out.is_file() else []
    return p.returncode, rows, p.stdout + p.stderr


def log(msg: str) -> None:
    """A timestamped progress line."""
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def run_fit(store: Store, model: str, topology: str) -> dict | None:
    """`--fit` of the SoFT recipe on `model` for `topology`; every candidate's row is kept."""
    key = f"{model}|{topology}"
    if key not in store.fits:
        log(f"fit {key}")
        code, rows, out = compile_cli(["--topology", topology, "--fit",
                                       *mesh_flags(topology), *model_flags(model, "soft")])
        if code not in (0, 3):
            log(f"  failed ({code}): {out[-2000:]}")
            return None
        chosen = next((r for r in rows if r.get("chosen")), None)
        for r in rows:
            store.rows.setdefault(key_of(r, model), r)
        store.fits[key] = {"fits": chosen is not None, "mesh": mesh_flags(topology),
                           "remat": chosen and chosen["remat"],
                           "grad_accum": chosen and chosen["grad_accum"],
                           "tried": [key_of(r, model) for r in rows]}
        store.save()
        log(f"  -> {store.fits[key]}")
    return store.fits[key]


def run_row(store: Store, model: str, topology: str, mode: str, remat: str, accum: int):
    """One compiled step, unless its row is there."""
    key = row_key(model, topology, mode, remat, accum)
    if key in store.rows:
        return store.rows[key]
    log(f"row {key}")
    code, rows, out = compile_cli(["--topology", topology, *mesh_flags(topology),
                                   *model_flags(model, mode),
                                   f"--config.model.remat_policy={remat}",
                                   f"--config.grad_accum={accum}"])
    if code not in (0, 3) or not rows:
        log(f"  failed ({code}): {out[-2000:]}")
        return None
    store.rows[key] = rows[0]
    store.save()
    log(f"  -> peak {rows[0]['peak_gib']}, fits {rows[0]['fits']}, {rows[0]['compile_s']:.0f} s")
    return rows[0]


def run_decode(store: Store, model: str, topology: str, tensor: int, split: bool) -> None:
    """Greedy and self-speculative decoding in bf16 with 2048 cache slots."""
    key = decode_key(model, topology, tensor, split)
    if key in store.decode:
        return
    log(f"decode {key}")
    code, rows, out = compile_cli(["--topology", topology, "--decode", "--tensor", str(tensor),
                                   *model_flags(model, "soft")]
                                  + (["--decode-split-layers"] if split else []))
    if code not in (0, 3) or not rows:
        log(f"  failed ({code}): {out[-2000:]}")
        return
    store.decode[key] = rows
    store.save()


def table_jobs(store: Store, model: str, topology: str) -> None:
    """The docs table's cell group: the fitted SoFT step, SFT and ICT with the same flags
    (with remat full and the smallest micro-batch when nothing fits)."""
    fitted = run_fit(store, model, topology)
    if fitted is None:
        return
    remat = fitted["remat"] or "full"
    accum = fitted["grad_accum"] or BATCH // min(BATCH, chips(topology))
    for mode in ("soft", "sft", "ict"):
        run_row(store, model, topology, mode, remat, accum)


def planner_topologies(model: str) -> tuple[str, ...]:
    """The slices of the planner comparison (70B: a v5e slice its state fits)."""
    return ("v5e-256" if model == "llama2-70b" else "v5e-32", "v4-64", "v5p-64")


# (model, slice, tensor-parallel chips, per-layer copy): greedy and speculative decoding
DECODE_JOBS = (("llama2-7b", "v5e-1", 1, False), ("llama2-7b", "v5e-1", 1, True),
               ("llama2-7b", "v5e-4", 2, False))


def decode_key(model: str, topology: str, tensor: int, split: bool) -> str:
    """The store's key of one decoding job."""
    return f"{model}|{topology}|tensor{tensor}|{'split' if split else 'stacked'}"


STAGES = {
    "fit-13b": lambda s: [table_jobs(s, "llama2-13b", t) for t in ("v5e-32", "v4-32")],
    "paper-as-is": lambda s: [run_row(s, "llama2-13b", t, "soft", "save_dots", 8)
                              for t in ("v5p-32", "v5p-64")],
    "decode": lambda s: [run_decode(s, *job) for job in DECODE_JOBS],
    "planner-13b": lambda s: planner_rows(s, "llama2-13b", "v5e-32"),
    "table": lambda s: [table_jobs(s, m, t) for m in MODELS for t in TABLE_TOPOLOGIES],
    "planner": lambda s: [planner_rows(s, m, t) for m in ("llama2-7b", "llama2-13b", "llama2-70b")
                          for t in planner_topologies(m)],
}


def planner_rows(store: Store, model: str, topology: str) -> None:
    """The planner comparison's rows: three remat policies x SFT / SoFT / ICT, grad_accum 1."""
    for remat in PLANNER_POLICIES:
        for mode in ("sft", "soft", "ict"):
            run_row(store, model, topology, mode, remat, 1)


# ------------------------------------------------------------------------------- report
def planned_gib(row: dict, model: str) -> float:
    """soft_jax.memory's estimate for a compiled row's step (GiB per chip)."""
    from soft_jax.model.config import preset
    from soft_jax.train.memory import parse_mesh, plan
    from soft_jax.train.modes import exit_heads_for

    exits = MODELS[model]
    config = preset(model, dtype="bfloat16", param_dtype="float32", remat_policy=row["remat"],
                    exits=exits, num_exit_heads=exit_heads_for(row["mode"], exits))
    p = plan(config, parse_mesh(row["mesh"]), row["batch"], row["seq"],
             grad_accum=row["grad_accum"], mode=row["mode"], backend="tpu")
    return p.total / 2 ** 30


def _cell(row: dict | None) -> str:
    if row is None:
        return "pending"
    if row["peak_gib"] is None:
        why = (f"temporaries {row['temp_gib']:.2f}" if row.get("temp_gib")
               else f"state {row['argument_gib']:.1f}")
        return f"OOM ({why})"
    return f"{row['peak_gib']:.2f}" + ("" if row["fits"] else " OOM")


def table_report(store: Store) -> list[str]:
    """The docs table: per model and slice, the fitted flags and SFT / SoFT / ICT peaks."""
    out = ["| model | slice (HBM/chip) | `--fit` flags (SoFT) | SFT | SoFT | ICT | SoFT/SFT | "
           "compile s (SoFT) |", "|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for topo in TABLE_TOPOLOGIES:
            fitted = store.fits.get(f"{model}|{topo}")
            if fitted is None:
                out.append(f"| {model} | {topo} | pending | | | | | |")
                continue
            remat = fitted["remat"] or "full"
            accum = fitted["grad_accum"] or BATCH // min(BATCH, chips(topo))
            rows = {m: store.rows.get(row_key(model, topo, m, remat, accum))
                    for m in ("sft", "soft", "ict")}
            hbm = next((r["hbm_gib"] for r in rows.values() if r), None)
            tensor = mesh_flags(topo)[-1].split("=")[1]
            flags = (f"remat_policy={remat} grad_accum={accum}"
                     + (f" mesh.tensor={tensor}" if tensor != "1" else "")
                     if fitted["fits"] else "nothing fits (remat full shown)")
            soft, sft = rows["soft"], rows["sft"]
            ratio = (f"{soft['peak_gib'] / sft['peak_gib']:.3f}" if soft and sft
                     and soft["peak_gib"] and sft["peak_gib"] else "-")
            secs = f"{soft['compile_s']:.0f}" if soft else "-"
            out.append(f"| {model} | {topo} ({hbm if hbm else '?'}) | {flags} | "
                       f"{_cell(sft)} | {_cell(soft)} | {_cell(rows['ict'])} | {ratio} | "
                       f"{secs} |")
    return out


def planner_report(store: Store) -> list[str]:
    """Every compiled row that has a peak against the planner's estimate."""
    out = ["| step (model / slice / mode / remat / grad_accum) | compiled | planner | error |",
           "|---|---|---|---|"]
    errors: dict[str, list[float]] = {}
    for key, row in sorted(store.rows.items()):
        if row["peak_gib"] is None:
            continue
        est = planned_gib(row, key.split("|")[0])
        err = est / row["peak_gib"] - 1
        errors.setdefault(row["mode"], []).append(err)
        out.append(f"| {key.replace('|', ' / ')} | {row['peak_gib']:.2f} | {est:.2f} | "
                   f"{100 * err:+.1f}% |")
    summary = [f"- {mode}: {len(e)} steps, median |error| {100 * sorted(map(abs, e))[len(e) // 2]:.1f}%, "
               f"within +-3%: {sum(abs(x) <= 0.03 for x in e)}, within +-10%: "
               f"{sum(abs(x) <= 0.10 for x in e)}, range {100 * min(e):+.1f}% .. "
               f"{100 * max(e):+.1f}%" for mode, e in sorted(errors.items())]
    return summary + [""] + out


def decode_report(store: Store) -> list[str]:
    """The generation rows as a table."""
    out = ["| model / slice / weights | program | weights GiB | KV cache GiB | temporaries | "
           "peak | held | fits |", "|---|---|---|---|---|---|---|---|"]
    for key, rows in store.decode.items():
        for r in rows:
            out.append(f"| {key.replace('|', ' / ')} | {r['mode']} | {r['params_gib']:.2f} | "
                       f"{r['kv_cache_gib']:.2f} | {r['temp_gib']:.2f} | {_cell(r)} | "
                       + (f"{r['held_gib']:.2f}" if r.get("held_gib") else "-")
                       + f" | {r['fits']} |")
    return out


def pending(store: Store) -> list[str]:
    """Jobs of every stage whose result is not stored yet."""
    todo = [f"fit {m} {t}" for m in MODELS for t in TABLE_TOPOLOGIES
            if f"{m}|{t}" not in store.fits]
    todo += [f"row {row_key(m, t, mode, r, 1)}" for m in ("llama2-7b", "llama2-13b", "llama2-70b")
             for t in planner_topologies(m) for r in PLANNER_POLICIES
             for mode in ("sft", "soft", "ict") if row_key(m, t, mode, r, 1) not in store.rows]
    todo += [f"decode {decode_key(*job)}" for job in DECODE_JOBS
             if decode_key(*job) not in store.decode]
    return todo


def report(store: Store) -> str:
    """docs/tpu.md's tables, from whatever rows are stored."""
    todo = pending(store)
    return "\n".join(["## Train steps", *table_report(store), "", "## Planner vs compiler",
                       *planner_report(store), "", "## Generation", *decode_report(store), "",
                       f"## Pending ({len(todo)})", *[f"- {t}" for t in todo]])


def main(argv=None) -> None:
    """Run the stages (or --report); see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=str(ROOT / "docs" / "tpu_rows.json"))
    ap.add_argument("--only", choices=tuple(STAGES), action="append")
    ap.add_argument("--report", action="store_true", help="print the tables, compile nothing")
    ap.add_argument("--write", help="with --report: replace what follows MARKER in this file")
    a = ap.parse_args(argv)
    store = Store(Path(a.rows))
    if a.report:
        tables = report(store)
        if a.write:
            doc = Path(a.write).read_text()
            Path(a.write).write_text(doc[:doc.index(MARKER) + len(MARKER)] + "\n\n" + tables
                                     + "\n")
        else:
            print(tables)
        return
    for name in a.only or STAGES:
        log(f"stage {name}")
        STAGES[name](store)
    log("done")


if __name__ == "__main__":
    main()
