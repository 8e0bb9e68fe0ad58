"""A training run's output: process 0 alone prints progress lines and writes the shared
files (config files, metrics.jsonl, eval.jsonl, TensorBoard); other processes write nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from soft_jax.parallel import distributed
from soft_jax.utils.log import log


class RunWriter:
    """The one writer of a run's shared files and progress lines: process 0 writes config
    files, metrics.jsonl, eval.jsonl and TensorBoard; on other processes every call is a no-op."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.primary = distributed.is_primary()
        self._tb = None

    def write_text(self, name: str, text: str) -> None:
        """Write `workdir / name` (replacing it)."""
        if self.primary:
            (self.workdir / name).write_text(text)

    def _record(self, file: str, record: dict, scalars: dict, step: int) -> None:
        if not self.primary:
            return
        with open(self.workdir / file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tb"))
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def metrics(self, step: int, metrics: dict) -> None:
        """One logged training step: a metrics.jsonl line and `train/*` scalars."""
        m = {k: float(v) for k, v in metrics.items()}
        self._record("metrics.jsonl", m, {f"train/{k}": v for k, v in m.items()}, step)

    def eval(self, step: int, results: dict) -> None:
        """Held-out per-exit results: a log line, an eval.jsonl line and `eval/*` scalars."""
        log("eval " + " ".join(f"{e}: loss {r['loss']:.3f} acc {r['accuracy']:.3f}"
                               for e, r in results.items()))
        scalars = {}
        for e, r in results.items():
            scalars.update({f"eval/loss_exit_{e}": r["loss"],
                            f"eval/accuracy_exit_{e}": r["accuracy"]})
        self._record("eval.jsonl", {"step": step, **{str(e): r for e, r in results.items()}},
                     scalars, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Tokens/s between logged steps and the history of logged metrics."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.history: list[dict] = []
        self._t, self._steps = time.perf_counter(), 0

    def tick(self) -> None:
        """One more step done."""
        self._steps += 1

    def record(self, step: int, metrics, epoch: float) -> dict:
        """The step's metrics as floats with step, tokens_per_s and epoch; kept in history."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
        now = time.perf_counter()
        m.update(step=step, tokens_per_s=self._steps * self.tokens_per_step / (now - self._t),
                 epoch=epoch)
        self._t, self._steps = now, 0
        self.history.append(m)
        return m


def format_metrics(step: int, total: int, m: dict, exits: tuple[int, ...]) -> str:
    """The progress line of a logged step."""
    per_exit = " ".join(f"{e}:{m[f'loss/exit_{e}']:.3f}" for e in exits if f"loss/exit_{e}" in m)
    return (f"step {step}/{total} | loss {m['loss']:.4f} | exits {per_exit} | lr {m['lr']:.2e}"
            f" | gnorm {m['grad_norm']:.2f} | {m['tokens_per_s']:,.0f} tok/s")
