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
S0 with `branch_decay_steps` D0 gives S = S0, T = S0 + D0.
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
        if self.name == "constant":
            return f"constant lr {self.peak_lr:g} after {self.warmup_steps} {self.warmup_type} warmup steps"
        return (
            f"{self.name}: peak lr {self.peak_lr:g}; {self.warmup_type} warmup steps 0-{self.warmup_steps - 1}; "
            f"stable to step {self.decay_start - 1}; {self.decay_type} decay over steps {self.decay_start}-"
            f"{self.decay_start + self.decay_steps - 1} to {self.min_lr_ratio:g} x peak; {self.total_steps} steps"
        )


def build_schedule(cfg, peak_lr: float, total_steps: int, branch_from: int | None = None) -> Schedule:
    """cfg: a SchedulerSchema. `branch_from`: the step of the checkpoint a decay branch starts at."""
    warmup = _steps(cfg.warmup, total_steps, "warmup")
    common = dict(warmup_type=cfg.warmup_type, decay_type=cfg.decay_type, min_lr_ratio=cfg.min_lr_ratio)
    if branch_from is not None:
        if cfg.name != "wsd" or not cfg.branch_decay_steps:
            raise ValueError("a decay branch needs scheduler.name=wsd and scheduler.branch_decay_steps > 0")
        if branch_from < warmup:
            raise ValueError(f"a decay branch must start after warmup (step {branch_from} < {warmup})")
        total = branch_from + cfg.branch_decay_steps
        return Schedule("wsd", peak_lr, total, warmup, branch_from, cfg.branch_decay_steps, **common)
    if cfg.name == "constant":
        return Schedule("constant", peak_lr, total_steps, warmup, total_steps, 0, **common)
    if cfg.name == "cosine":
        return Schedule("cosine", peak_lr, total_steps, warmup, warmup, total_steps - warmup,
                        cfg.warmup_type, "cosine", cfg.min_lr_ratio)
    decay = _steps(cfg.decay, total_steps, "decay")
    if warmup + decay > total_steps:
        raise ValueError(f"warmup ({warmup}) + decay ({decay}) steps exceed the run ({total_steps} steps)")
    return Schedule("wsd", peak_lr, total_steps, warmup, total_steps - decay, decay, **common)
