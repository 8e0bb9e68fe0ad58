"""The divergence guard: tells a dead or diverging run from a healthy one, step by step.

A step's loss and gradient norm describe the params *before* its update. The run has
diverged when

* they are NaN / inf (at once),
* the gradient norm is zero (at most `zero_grad_norm`) for `zero_grad_steps` steps in a row:
  a dead model (e.g. a uniform one at loss ln V) that no batch moves any more, or
* the loss stays above `spike_factor` x the median of the last `spike_window` healthy losses
  for `spike_steps` steps in a row (a single spike is left alone, as are the first
  MIN_HISTORY steps, whose median is not yet meaningful).

Steps without target tokens carry no signal and are skipped. A rule with 0 steps is off.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics

MIN_HISTORY = 10  # healthy losses needed before a median counts as "recent"


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Why and when the run diverged: `step` completes the streak that began at `first`."""

    step: int
    first: int
    reason: str


@dataclasses.dataclass(frozen=True)
class GuardSettings:
    """The thresholds of the guard (`config.guard`)."""

    zero_grad_steps: int = 5
    zero_grad_norm: float = 1e-12
    spike_factor: float = 3.0
    spike_steps: int = 5
    spike_window: int = 100

    @classmethod
    def from_config(cls, guard) -> "GuardSettings":
        """The settings of a run config's `guard` section."""
        return cls(**{f.name: guard[f.name] for f in dataclasses.fields(cls)})


class _Streak:
    """The run of consecutive steps that break one rule (`length` 0: the rule is off)."""

    def __init__(self, length: int):
        self.length, self.first = length, None

    def update(self, step: int, broken: bool) -> bool:
        """Record whether `step` breaks the rule; True once it has for `length` steps."""
        if not self.length or not broken:
            self.first = None
            return False
        self.first = self.first or step
        return step - self.first + 1 >= self.length


class DivergenceGuard:
    """Watches one step after another; `observe` returns a Divergence when the run has one."""

    def __init__(self, settings: GuardSettings):
        self.s = settings
        self.history: collections.deque = collections.deque(maxlen=settings.spike_window)
        self.last_step = 0
        self._zero = _Streak(settings.zero_grad_steps)
        self._spike = _Streak(settings.spike_steps)

    @property
    def healthy(self) -> bool:
        """No streak is open: the last observed step looked like a live, converging run."""
        return self._zero.first is None and self._spike.first is None

    def rewind(self, step: int) -> None:
        """Forget everything after `step` (the run restarts from a checkpoint there)."""
        self.history = collections.deque(((s, x) for s, x in self.history if s <= step),
                                         maxlen=self.s.spike_window)
        self.last_step = step
        self._zero.first = self._spike.first = None

    def observe(self, step: int, loss: float, grad_norm: float,
                tokens: float) -> Divergence | None:
        """Take the metrics of `step` (each step once, in order; repeats are ignored)."""
        if step <= self.last_step:
            return None
        self.last_step = step
        bad = {k: v for k, v in (("loss", loss), ("grad_norm", grad_norm)) if not math.isfinite(v)}
        if bad:
            return Divergence(step, step, "non-finite " + " and ".join(
                f"{k}={v}" for k, v in bad.items()) + f" at step {step}")
        if tokens <= 0:
            return None
        median = self.median()
        dead = self._zero.update(step, grad_norm <= self.s.zero_grad_norm)
        spiked = self._spike.update(step, median is not None
                                    and loss > self.s.spike_factor * median)
        if self.healthy:
            self.history.append((step, loss))
        if dead:
            return Divergence(step, self._zero.first, (
                f"gradient norm {grad_norm:g} (<= {self.s.zero_grad_norm:g}) for "
                f"{self.s.zero_grad_steps} steps in a row at step {step}, since step "
                f"{self._zero.first}: the model no longer learns"))
        if spiked:
            return Divergence(step, self._spike.first, (
                f"loss {loss:.4g} above {self.s.spike_factor:g}x its recent median "
                f"{median:.4g} for {self.s.spike_steps} steps in a row at step {step}, since "
                f"step {self._spike.first}"))
        return None

    def median(self) -> float | None:
        """The median of the recent healthy losses (None until MIN_HISTORY of them)."""
        if len(self.history) < MIN_HISTORY:
            return None
        return statistics.median(x for _, x in self.history)
