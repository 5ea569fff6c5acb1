"""Metrics: `<output_dir>/metrics.jsonl` (one JSON object per logged step), a progress bar on rank 0,
optional wandb (offline by default; a resumed run continues the same wandb run), and MFU."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def measured_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Matmul throughput of this device in the training dtype: the denominator of MFU when no
    `trainer.peak_flops` is configured (on a GPU, configure the datasheet figure instead)."""
    n = 1024 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    # the best of a few windows: one slow moment (another process, a shared host) must not make the
    # peak low and the MFU of the whole run look better than 100%
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


class MetricsLogger:
    def __init__(self, output_dir: Path, is_main: bool, logger_cfg, run_id: str, resume_step: int,
                 total_steps: int, config: dict, progress: bool):
        self.is_main = is_main
        self.path = output_dir / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        if resume_step and self.path.is_file():
            # drop lines a killed run logged after its last checkpoint; they are about to be redone
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif not resume_step and self.path.is_file():
            self.path.unlink()
        if logger_cfg.name == "wandb":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=logger_cfg.project, name=logger_cfg.run_name, id=run_id, resume="allow", mode=logger_cfg.mode,
                dir=logger_cfg.dir or str(output_dir), config=config,
            )
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step, dynamic_ncols=True, desc="train")

    def log(self, step: int, values: dict) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def progress(self, step: int, loss: float, lr: float, tokens_per_sec: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def expert_shares(counts: torch.Tensor, digits: int = 6) -> list[list[float]]:
    """One step's (routers, experts) pick counts -> per router, each expert's share of its picks: the
    `expert_load` field of metrics.jsonl (train.plot draws it as a router x expert heatmap). Rounded,
    since a line carries routers x experts numbers."""
    counts = counts.detach().float().cpu()
    shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-9)
    return [[round(v, digits) for v in row] for row in shares.tolist()]


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
