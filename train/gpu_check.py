"""`make gpu-check` / `python -m train.gpu_check [--quick] [--sizes tiny 20m] [--layouts ...] [--steps N]
[--nproc N] [--keep DIR] [overrides ...]`: the first thing to run on a GPU machine.

Each engine (DDP, DeepSpeed ZeRO-1/2/3, 2 pipeline stages, expert parallelism over 2 ranks) trains the
tiny and 20M presets for a few steps through the real entry point (`torchrun -m train`, one rank per
GPU), in bf16 and in fp32, saves a checkpoint halfway and resumes from it; then, per layout:

  * the bf16 losses against fp32's, step by step, within `loss_tolerance` (derived from bf16's 8
    significant bits, below);
  * the resumed run's losses against the uninterrupted run's, within the same tolerance (on CUDA a
    resume is not bit for bit: atomics sum in a varying order);
  * tokens/s, MFU against the run's peak (trainer.peak_flops, else the GPU's datasheet figure: the line
    says which), and the peak memory of each rank (host, and device as nvidia-smi sees it).

Overrides after the options go to every run (e.g. `trainer.peak_flops=989e12`). It runs on a CPU too, so
that it does not rot (a test runs `--quick`: one layout, 2 steps): what needs GPUs is skipped, with a line
saying what and why. Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import yaml

from .bench_parallel import LAYOUTS, REPO, run_with_rank_peaks

# bf16 keeps 8 significant bits (7 stored and the implicit one): rounding to it moves a value by at most
# u = 2^-8 of itself
BF16_UNIT_ROUNDOFF = 2.0**-8
# matrix-product stages per decoder layer on the way to a logit: attention's q/k/v projection, its scores,
# the mix of the values and its output projection; the MLP's input and output projections
PRODUCTS_PER_LAYER = 6

# (dense model, MoE model) per size; the MoE model runs under DDP and expert parallelism
SIZES = {"tiny": ("doge-tiny", "jetmoe-tiny"), "20m": ("doge-20m", "doge-20m-moe")}
DENSE_LAYOUTS = ("ddp", "zero1", "zero2", "zero3", "pipeline")
MOE_LAYOUTS = ("ddp", "ep")
RANKS_NEEDED = {"pipeline": 2, "ep": 2}  # a multiple of this many ranks (stages, expert groups)


def loss_tolerance(num_layers: int) -> float:
    """The relative difference allowed between a step's loss in bf16 and in fp32, and between two bf16
    runs of the same steps (a resumed run on CUDA, whose atomics sum in another order).

    Under autocast a matrix product rounds both operands to bf16 (each off by at most u = 2^-8 relative)
    and accumulates in fp32: its output is off by up to 2u relative. A logit ends a chain of such
    products, PRODUCTS_PER_LAYER per decoder layer and the head's. Roundings at different stages are
    independent and of either sign, so their errors add in quadrature: sqrt(6 L + 1) · 2u relative on
    the logits, and so on the loss, whose change is at most twice the largest logit's and which is of the
    logits' order at the start of training. Over a few steps the weights drift by less: AdamW's update,
    lr times a normalised gradient, is off by the same relative error times lr. A broken kernel, wrong
    gradients or a resume that restored the wrong state move the loss by far more. (An estimate, not a
    worst-case bound: a router's top-k can flip on a near tie, which moves the loss of a few tokens out of
    thousands.) doge-tiny (2 layers): 2.8%; doge-20m (8 layers): 5.5%."""
    return math.sqrt(PRODUCTS_PER_LAYER * num_layers + 1) * 2 * BF16_UNIT_ROUNDOFF


def compare_losses(candidate: dict[int, float], reference: dict[int, float], tolerance: float) -> tuple[bool, str]:
    """(within tolerance at every step both have, a description): the largest relative difference."""
    steps = sorted(set(candidate) & set(reference))
    if not steps:
        return False, "no common steps to compare"
    worst = max(steps, key=lambda s: abs(candidate[s] - reference[s]) / abs(reference[s]))
    difference = abs(candidate[worst] - reference[worst]) / abs(reference[worst])
    ok = all(math.isfinite(candidate[s]) for s in steps) and difference <= tolerance
    return ok, (f"steps {steps[0]}-{steps[-1]}: largest relative difference {difference:.2e} (step {worst}: "
                f"{candidate[worst]:.5f} against {reference[worst]:.5f}), tolerance {tolerance:.2e}")


@dataclass
class Run:
    ok: bool
    stderr: str
    records: list[dict]
    host_peaks: dict[int, int]
    device_peaks: dict[int, int]

    @property
    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if "loss" in r}

    def steady(self, key: str) -> float:
        """The median of `key` over the logged steps after the first (which compiles, warms caches)."""
        values = [r[key] for r in self.records if key in r]
        return statistics.median(values[1:] or values)


class DeviceMemory:
    """Peak device memory of each rank as nvidia-smi sees it (the caching allocator's reservation and the
    CUDA context: what counts against the GPU's memory), sampled twice a second while a run lasts."""

    def __init__(self):
        self.peaks: dict[int, int] = {}
        self._ranks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.stdout.splitlines():
                pid, _, mib = (part.strip() for part in line.partition(","))
                if not (pid.isdigit() and mib.isdigit()):
                    continue  # "[N/A]" where the driver does not say
                rank = self._rank(int(pid))
                if rank is not None:
                    self.peaks[rank] = max(self.peaks.get(rank, 0), int(mib) * 2**20)

    def _rank(self, pid: int) -> int | None:
        if pid not in self._ranks:
            try:
                self._ranks[pid] = int(psutil.Process(pid).environ()["RANK"])
            except (psutil.Error, KeyError, ValueError):
                return None  # another job's process, or one this user may not read
        return self._ranks[pid]


def run_training(overrides: list[str], nproc: int, output_dir: Path, cuda: bool) -> Run:
    cmd = [sys.executable, "-m", "train.launch", "torchrun", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "train", *overrides, f"trainer.output_dir={output_dir}"]
    with DeviceMemory() if cuda else contextlib.nullcontext() as device:
        proc, host_peaks = run_with_rank_peaks(cmd, None, REPO)
    metrics = output_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.is_file() else []
    return Run(proc.returncode == 0, proc.stderr, records, host_peaks, getattr(device, "peaks", {}))


def checks(sizes: list[str], layouts: list[str]) -> list[tuple[str, str]]:
    """(model, layout) pairs, in order."""
    pairs = []
    for size in sizes:
        dense, moe = SIZES[size]
        pairs += [(dense, layout) for layout in DENSE_LAYOUTS if layout in layouts]
        pairs += [(moe, layout) for layout in MOE_LAYOUTS if layout in layouts]
    return pairs


def skip_reason(layout: str, nproc: int, cuda: bool, gpus: int) -> str | None:
    needed = RANKS_NEEDED.get(layout, 1)
    if nproc % needed == 0:
        return None
    if not cuda:
        return (f"needs {needed} ranks, one per GPU, and this machine has no CUDA device (on a CPU the check runs "
                f"one process; the test suite runs this layout over gloo)")
    return f"needs a multiple of {needed} ranks, one per GPU; this run has {nproc} (GPUs visible: {gpus})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one layout (ddp) on the tiny preset, 2 steps")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--layouts", nargs="+", default=list(dict.fromkeys(DENSE_LAYOUTS + MOE_LAYOUTS)),
                        choices=list(dict.fromkeys(DENSE_LAYOUTS + MOE_LAYOUTS)))
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the resume starts halfway")
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: one per visible GPU; 1 on a CPU)")
    parser.add_argument("--keep", type=Path, default=None, help="write the runs here and keep them")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.layouts, args.steps = ["tiny"], ["ddp"], 2
    if args.steps < 2:
        parser.error("--steps must be >= 2 (a checkpoint halfway, then the resume)")

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    nproc = args.nproc or gpus or 1
    if cuda:
        print(f"gpu-check: {gpus} x {torch.cuda.get_device_name(0)}, {nproc} ranks, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}", flush=True)
        if not torch.cuda.is_bf16_supported():
            print("gpu-check: skipped everything: this GPU has no bf16 (torch.cuda.is_bf16_supported() is False), "
                  "and the check compares bf16 runs against fp32", flush=True)
            return 0
    else:
        print("gpu-check: no CUDA device: running on the CPU, in one process; what needs GPUs is skipped "
              "(device memory, the layouts of several ranks)", flush=True)

    pairs = checks(args.sizes, args.layouts)
    if args.quick:
        pairs = pairs[:1]
        print(f"gpu-check: --quick: only {pairs[0][0]} under {pairs[0][1]}, {args.steps} steps; skipped: the other "
              f"layouts and sizes", flush=True)
    half = args.steps // 2
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for model, layout in pairs:
            name = f"{model} {layout}"
            reason = skip_reason(layout, nproc, cuda, gpus)
            if reason:
                print(f"skipped: {name}: {reason}", flush=True)
                continue
            layers = yaml.safe_load((REPO / "configs" / "model" / f"{model}.yaml").read_text())["num_hidden_layers"]
            tolerance = loss_tolerance(layers)
            common = [f"model={model}", *LAYOUTS[layout], f"trainer.device={'cuda' if cuda else 'cpu'}",
                      f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={4 * nproc}",
                      "trainer.micro_batch_size=2", "trainer.log_every=1", "trainer.progress=false",
                      "trainer.eval_every=0", "trainer.plot=false", *args.overrides]
            where = root / model / layout
            print(f"{name} ({nproc} rank{'s' * (nproc > 1)}, {'cuda' if cuda else 'cpu'}):", flush=True)
            fp32 = run_training([*common, "trainer.precision=fp32", "trainer.tf32=false"], nproc, where / "fp32",
                                cuda)
            bf16 = run_training([*common, "trainer.precision=bf16", f"trainer.save_every={half}"], nproc,
                                where / "bf16", cuda)
            resumed = run_training([*common, "trainer.precision=bf16",
                             f"trainer.resume={where / 'bf16' / 'checkpoints' / f'step-{half}'}"], nproc,
                            where / "resumed", cuda) if bf16.ok else None
            runs = {"fp32": fp32, "bf16": bf16, "resumed": resumed}
            broken = [label for label, run in runs.items() if run is not None and not run.ok]
            if broken:
                failed += 1
                for label in broken:
                    print(f"  FAILED: the {label} run exited non-zero; its last lines:\n    "
                          + "\n    ".join(runs[label].stderr.strip().splitlines()[-15:]), flush=True)
                continue
            for label, (ok, text) in {
                "bf16 against fp32": compare_losses(bf16.losses, fp32.losses, tolerance),
                f"resumed at step {half} against uninterrupted (bf16)": compare_losses(
                    resumed.losses, {s: v for s, v in bf16.losses.items() if s > half}, tolerance),
            }.items():
                passed, failed = passed + ok, failed + (not ok)
                print(f"  {label}, {text}: {'ok' if ok else 'FAILED'}", flush=True)
            peak = re.search(r"MFU relative to (\S+) FLOP/s per device: (.*)", bf16.stderr)
            print(f"  bf16: {bf16.steady('tokens_per_sec'):,.0f} tokens/s, MFU {100 * bf16.steady('mfu'):.2f}% of "
                  + (f"{peak.group(1)} FLOP/s per device ({peak.group(2)})" if peak else "the run's peak"), flush=True)
            host = ", ".join(f"rank {r} {b / 2**30:.2f} GiB" for r, b in sorted(bf16.host_peaks.items()))
            device = (", ".join(f"rank {r} {b / 2**30:.2f} GiB" for r, b in sorted(bf16.device_peaks.items()))
                      or "not seen (nvidia-smi shows no process of this run)") if cuda else "no CUDA device"
            print(f"  bf16 peak memory: host {host}; device {device}", flush=True)
    print(f"gpu-check: {passed} checks passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
