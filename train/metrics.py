"""Metrics: `<output_dir>/metrics.jsonl` (one JSON object per logged step), a progress bar on rank 0,
optional wandb (offline by default; a resumed run continues the same wandb run), and MFU."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def measured_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Matmul throughput of this device in the training dtype: the denominator of MFU when neither
    `trainer.peak_flops` nor a datasheet figure (a GPU of DATASHEET_PEAKS) gives one."""
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


@dataclass(frozen=True)
class DatasheetPeak:
    """One GPU model's datasheet peaks in FLOP/s, dense (no 2:4 structured sparsity, which the tensor-core
    figures of recent datasheets include and training does not use)."""

    model: str  # as the datasheet names it
    pattern: str  # searched (case-insensitively) in torch.cuda.get_device_name()
    bf16: float | None  # BF16 tensor cores, fp32 accumulation; None: no bf16 tensor cores
    tf32: float | None  # TF32 tensor cores (fp32 products with trainer.tf32); None: no TF32, fp32 runs at `fp32`
    fp32: float  # FP32 without tensor cores


_T = 1e12
# Sources, per row. Where a datasheet gives only figures "with sparsity" (marked * there), they are halved.
# The first row whose pattern matches wins: the more specific rows come first. A variant missing here
# (A10G, L40, H800, a laptop GPU) matches none and the peak is measured, with a warning.
DATASHEET_PEAKS = (
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100): BF16 312, TF32 156, FP32
    # 19.5 TFLOPS, for SXM4 and PCIe, 40 and 80 GB alike
    DatasheetPeak("A100", r"\bA100\b", 312 * _T, 156 * _T, 19.5 * _T),
    # NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), tensor figures with sparsity:
    # PCIe BF16 1,513, TF32 756, FP32 51; NVL BF16 1,671, TF32 835, FP32 60; SXM BF16 1,979, TF32 989, FP32 67
    DatasheetPeak("H100 PCIe", r"\bH100\b.*\bPCIe\b", 756.5 * _T, 378 * _T, 51 * _T),
    DatasheetPeak("H100 NVL", r"\bH100 NVL\b", 835.5 * _T, 417.5 * _T, 60 * _T),
    DatasheetPeak("H100 SXM", r"\bH100\b", 989.5 * _T, 494.5 * _T, 67 * _T),  # "NVIDIA H100 80GB HBM3"
    # NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), with sparsity: SXM BF16
    # 1,979, TF32 989, FP32 67; NVL BF16 1,671, TF32 835, FP32 60 (the H100's compute, more memory)
    DatasheetPeak("H200 NVL", r"\bH200 NVL\b", 835.5 * _T, 417.5 * _T, 60 * _T),
    DatasheetPeak("H200 SXM", r"\bH200\b", 989.5 * _T, 494.5 * _T, 67 * _T),
    # NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s), dense figures: BF16 362.05, TF32 183, FP32 91.6
    DatasheetPeak("L40S", r"\bL40S\b", 362.05 * _T, 183 * _T, 91.6 * _T),
    # NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4), with sparsity: BF16 242, TF32 120; FP32 30.3
    DatasheetPeak("L4", r"\bL4\b", 121 * _T, 60 * _T, 30.3 * _T),
    # NVIDIA A10 datasheet (nvidia.com/en-us/data-center/products/a10-gpu): BF16 125, TF32 62.5, FP32 31.2
    DatasheetPeak("A10", r"\bA10\b", 125 * _T, 62.5 * _T, 31.2 * _T),
    # NVIDIA Ampere GA102 GPU architecture whitepaper, appendix A: RTX A6000 BF16 (fp32 accumulate) 154.8,
    # TF32 77.4, FP32 38.7; GeForce RTX 3090 BF16 (fp32 accumulate, half rate on GeForce) 71, TF32 35.6, FP32 35.6
    DatasheetPeak("RTX A6000", r"\bRTX A6000$", 154.8 * _T, 77.4 * _T, 38.7 * _T),
    DatasheetPeak("GeForce RTX 3090", r"\bRTX 3090$", 71 * _T, 35.6 * _T, 35.6 * _T),  # not the 3090 Ti
    # NVIDIA Ada GPU architecture whitepaper, appendix A: GeForce RTX 4090 BF16 (fp32 accumulate) 165.2, TF32
    # 82.6, FP32 82.6
    DatasheetPeak("GeForce RTX 4090", r"\bRTX 4090$", 165.2 * _T, 82.6 * _T, 82.6 * _T),  # not 4090 D / Laptop
    # NVIDIA V100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/v100): FP32 15.7 (SXM2), 14 (PCIe);
    # no bf16 and no TF32 (its tensor cores take fp16 only)
    DatasheetPeak("V100 SXM2", r"\bV100-SXM2\b", None, None, 15.7 * _T),
    DatasheetPeak("V100 PCIe", r"\bV100-PCIE\b", None, None, 14 * _T),
)


def datasheet_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool) -> tuple[float, str] | None:
    """(the datasheet's dense peak of this GPU for matrix products in `dtype`, which figure that is), or
    None for a GPU not in DATASHEET_PEAKS or without that precision (bf16 on a V100). `tf32`: fp32 products
    run on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)."""
    for peak in DATASHEET_PEAKS:
        if re.search(peak.pattern, device_name, re.IGNORECASE):
            if dtype == torch.bfloat16:
                return (peak.bf16, f"{peak.model} dense BF16") if peak.bf16 else None
            if tf32 and peak.tf32:
                return peak.tf32, f"{peak.model} dense TF32"
            return peak.fp32, f"{peak.model} FP32"
    return None


def gpu_name(device: torch.device) -> str | None:
    """The CUDA device's name as its driver gives it (e.g. "NVIDIA H100 80GB HBM3"); None off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


class PeakFlops:
    """The denominator of MFU: one device's peak FLOP/s. `trainer.peak_flops` when set; else on a GPU of
    DATASHEET_PEAKS its datasheet's dense figure for the run's matmul precision; else (a CPU, an unknown
    GPU: with a warning there) the rate of a matmul measured at start (`measured_peak_flops`), which on a
    GPU reaches only part of the datasheet's peak (60-70% of an H100's bf16), so the MFU reads high. A log
    line on rank 0 says which peak is used.

    A measured peak is only a lower bound of the device's: another process using the CPU (or GPU)
    while it is measured makes it low, and every MFU of the run then high, above 1 (1.8 was seen on a
    shared 2-core machine). An MFU above 1 is impossible, so none is ever logged: when a step outpaces
    the peak, the peak is measured again (once; the machine may be quiet now) and becomes the best of
    the measurements and the rate the run reached, which the device evidently can reach. The MFU is
    then an upper bound of the true one, and a warning says so. A configured or datasheet peak below the
    rate the run reached is wrong (another dtype's figure, a typo, a GPU variant the table takes for
    another): it is raised the same way, with a warning."""

    def __init__(self, configured: float | None, device: torch.device, dtype: torch.dtype, is_main: bool = True):
        self.configured = configured
        self.device, self.dtype = device, dtype
        self.is_main = is_main  # measures again and warns; the other ranks' MFU is not logged
        self.raised = False
        name = gpu_name(device)
        # fp32 products run on TF32 tensor cores when the run allows it (trainer.tf32, set before this), and
        # are then held against the TF32 figure
        sheet = None if configured or name is None else datasheet_peak_flops(
            name, dtype, torch.backends.cuda.matmul.allow_tf32)
        precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        if configured:
            self.source, self.value, what = "configured", configured, "trainer.peak_flops"
        elif sheet is not None:
            self.source, self.value = "datasheet", sheet[0]
            what = f"the datasheet's {sheet[1]} peak of this {name} (trainer.peak_flops overrides it)"
        else:
            self.source, self.value = "measured", measured_peak_flops(device, dtype)
            what = f"the rate of a {precision} matmul measured at start on this {name or device.type}"
            if name is not None and is_main:
                logger.warning(
                    "MFU: no datasheet peak known for %s in %s, so MFU is relative to a matmul measured at start "
                    "(%.3g FLOP/s), which reaches only part of the datasheet's peak: MFU reads high. Set "
                    "trainer.peak_flops to the datasheet's dense %s figure of this GPU (FLOP/s)", name, precision,
                    self.value, precision)
        if is_main:
            logger.info("MFU relative to %.4g FLOP/s per device: %s", self.value, what)

    def mfu(self, achieved: float, step: int) -> float:
        """`achieved`: FLOP/s of one device over the logged window (model FLOPs, not hardware counters)."""
        if achieved > self.value:
            self._raise_to(achieved, step)
        return achieved / self.value

    def _raise_to(self, achieved: float, step: int) -> None:
        before, again = self.value, None
        if self.source == "measured" and not self.raised and self.is_main:
            again = measured_peak_flops(self.device, self.dtype)
        self.value = max(before, again or 0.0, achieved)
        if self.raised or not self.is_main:
            return
        self.raised = True
        if self.source == "measured":
            logger.warning(
                "MFU: the matmul rate measured at start (%.3g FLOP/s) is below the %.3g FLOP/s this run reached at "
                "step %d: something else used the %s while it was measured. Measured again: %.3g FLOP/s. MFU is now "
                "relative to %.3g FLOP/s (the best seen) and may overstate the true figure: set trainer.peak_flops to "
                "the device's peak for a reliable MFU", before, achieved, step, self.device.type, again, self.value)
        elif self.source == "datasheet":
            logger.warning(
                "MFU: the datasheet peak taken for %s (%.3g FLOP/s) is below the %.3g FLOP/s per device this run "
                "reached at step %d, so it cannot be this GPU's peak (a variant the table takes for another?). MFU "
                "is now relative to the best rate seen; set trainer.peak_flops to this GPU's datasheet figure",
                gpu_name(self.device), before, achieved, step)
        else:
            logger.warning(
                "MFU: trainer.peak_flops=%g is below the %.3g FLOP/s per device this run reached at step %d, so it "
                "cannot be this device's peak (is it the figure for %s?). MFU is now relative to the best rate seen; "
                "correct trainer.peak_flops for a meaningful MFU", before, achieved, step, self.dtype)


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
