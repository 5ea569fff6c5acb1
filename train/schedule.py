"""Learning-rate schedules, as a function of the optimizer step.

Step s (0-based) is the s-th optimizer update; lr(s) = peak_lr * factor(s).

Warmup–stable–decay (WSD) over T steps, W warmup and D decay steps, decay starting at S = T - D:
    warmup  s < W:          linear (s+1)/W          cosine (1 - cos(pi (s+1)/W)) / 2
    stable  W <= s < S:     1
    decay   S <= s < T:     p = (s - S + 1)/D in (0, 1], m = min_lr_ratio
                            linear 1 - p(1 - m)     cosine m + (1 - m)(1 + cos(pi p))/2     1-sqrt  m + (1 - m)(1 - sqrt(p))
So the first step already learns (lr > 0), the last warmup step is at peak, the last step is at m.
`cosine`: warmup, then cosine from peak to m over the rest. `constant`: warmup, then peak.

A decay branch (the WSD paper's many-models-from-one-run): resuming a stable-phase checkpoint at step
S0 with `branch_decay_steps` D0 gives S = S0, T = S0 + D0; with `branch_decay_fraction` f instead,
D0 = round(f * S0) (at least 1), so branches from several checkpoints each decay over the same share
of their length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _steps(value: float, total: int, what: str) -> int:
    if value < 0:
        raise ValueError(f"scheduler.{what}={value} must be >= 0")
    return int(round(value * total)) if value < 1 else int(value)


@dataclass(frozen=True)
class Schedule:
    name: str
    peak_lr: float
    total_steps: int
    warmup_steps: int
    decay_start: int
    decay_steps: int
    warmup_type: str = "linear"
    decay_type: str = "linear"
    min_lr_ratio: float = 0.0

    def factor(self, step: int) -> float:
        m = self.min_lr_ratio
        if step < self.warmup_steps:
            p = (step + 1) / self.warmup_steps
            return p if self.warmup_type == "linear" else 0.5 * (1 - math.cos(math.pi * p))
        if self.name == "constant" or step < self.decay_start:
            return 1.0
        p = min(1.0, (step - self.decay_start + 1) / max(1, self.decay_steps))
        if self.decay_type == "linear":
            return 1 - p * (1 - m)
        if self.decay_type == "cosine":
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
        return m + (1 - m) * (1 - math.sqrt(p))  # 1-sqrt

    def __call__(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def describe(self) -> str:
        warmup = _span("warmup", self.warmup_type, 0, self.warmup_steps)
        if self.name == "constant":
            return f"constant: peak lr {self.peak_lr:g}; {warmup}; then constant; {_steps_of(self.total_steps)}"
        stable = _span("stable", "", self.warmup_steps, self.decay_start)
        decay = _span("decay", self.decay_type, self.decay_start, self.decay_start + self.decay_steps)
        parts = [f"{self.name}: peak lr {self.peak_lr:g}", warmup]
        if self.name == "wsd":
            parts.append(stable)
        parts += [decay if self.decay_steps == 0 else f"{decay} to {self.min_lr_ratio:g} x peak", _steps_of(self.total_steps)]
        return "; ".join(parts)


def _steps_of(count: int) -> str:
    return "1 step" if count == 1 else f"{count} steps"


def _span(phase: str, kind: str, start: int, stop: int) -> str:
    """'linear warmup over steps 0-9', '... step 4', or 'no warmup' for an empty phase [start, stop)."""
    if stop <= start:
        return f"no {phase}"
    what = f"{kind} {phase}".strip()
    where = f"step {start}" if stop - start == 1 else f"steps {start}-{stop - 1}"
    return f"{what} {where}" if phase == "stable" else f"{what} over {where}"


def build_schedule(cfg, peak_lr: float, total_steps: int, branch_from: int | None = None) -> Schedule:
    """cfg: a SchedulerSchema. `branch_from`: the step of the checkpoint a decay branch starts at.
    Raises ValueError, naming the keys, when the phases do not fit in the run."""
    warmup = _steps(cfg.warmup, total_steps, "warmup")
    common = dict(warmup_type=cfg.warmup_type, decay_type=cfg.decay_type, min_lr_ratio=cfg.min_lr_ratio)
    if branch_from is not None:
        if cfg.name != "wsd" or not is_branch(cfg):
            raise ValueError("a decay branch needs scheduler.name=wsd and scheduler.branch_decay_steps > 0 or "
                             "scheduler.branch_decay_fraction > 0")
        if branch_from < warmup:
            raise ValueError(f"a decay branch must start after warmup (step {branch_from} < {warmup})")
        decay = branch_decay_steps(cfg, branch_from)
        return Schedule("wsd", peak_lr, branch_from + decay, warmup, branch_from, decay, **common)
    decay = _steps(cfg.decay, total_steps, "decay") if cfg.name == "wsd" else 0
    if warmup + decay > total_steps:
        phases = f"scheduler.warmup={cfg.warmup:g} ({warmup} steps)"
        if cfg.name == "wsd":
            phases += f" + scheduler.decay={cfg.decay:g} ({decay} steps) = {warmup + decay} steps"
        raise ValueError(
            f"{phases}: longer than the run (trainer.max_steps={total_steps}); shorten them (fractions < 1 scale with the "
            f"run) or lengthen the run")
    if cfg.name == "constant":
        return Schedule("constant", peak_lr, total_steps, warmup, total_steps, 0, **common)
    if cfg.name == "cosine":
        return Schedule("cosine", peak_lr, total_steps, warmup, warmup, total_steps - warmup,
                        cfg.warmup_type, "cosine", cfg.min_lr_ratio)
    return Schedule("wsd", peak_lr, total_steps, warmup, total_steps - decay, decay, **common)


def is_branch(cfg) -> bool:
    """Whether the scheduler config asks for a decay branch (from the checkpoint the run resumes)."""
    return bool(cfg.branch_decay_steps) or bool(cfg.branch_decay_fraction)


def branch_decay_steps(cfg, branch_from: int) -> int:
    """scheduler.branch_decay_steps, or branch_decay_fraction of the branch's start step (at least 1)."""
    if cfg.branch_decay_steps:
        return int(cfg.branch_decay_steps)
    return max(1, int(round(cfg.branch_decay_fraction * branch_from)))
