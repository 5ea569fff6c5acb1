"""Peak memory of one training step (forward + backward with labels), ours against transformers, on
the same weights and batch.

    python -m train.bench_memory                                  # doge-20m and glm4-small at 1 x 2048
    python -m train.bench_memory --case doge-20m-cdmoe jetmoe-small --seq 1024 --batch 2
    python -m train.bench_memory --case doge-tiny --set vocab_size=32768 --seq 1024

Each measurement runs in its own process, so nothing one implementation allocated or cached is seen
by the other. On CPU the figure is the step's peak resident memory above what the process held just
before the step (Linux's VmHWM, reset through /proc/self/clear_refs): activations, logits, the loss,
and the gradients (the same size for both, since the weights are the same). On CUDA it is
torch.cuda.max_memory_allocated() above the allocation before the step. The case names are those of
`python -m train.bench_models`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ("doge-20m", "glm4-small")
MiB = 1024**2


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory above the level at entry, in bytes, of the block it wraps."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.start


def child(args) -> None:
    """In this process: load `impl`'s model from the weights in args.weights and measure one step."""
    from train.bench_models import train_step, transformers_modes

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.child == "ours":
            import models

            model = models.from_pretrained(args.weights, device=device, dtype=dtype, attn_implementation=args.attn)
            kwargs = {}
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.weights, attn_implementation=args.attn, dtype=dtype).to(device)
            kwargs = transformers_modes(json.loads(Path(args.weights, "config.json").read_text()))[args.child]
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    with PeakMemory(device) as peak:
        train_step(model, ids, **kwargs)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    print(json.dumps({"peak": peak.peak, "weights": weights}), flush=True)


def measure(impl: str, weights: str, args) -> dict:
    cmd = [sys.executable, "-m", "train.bench_memory", "--child", impl, "--weights", weights, "--batch", str(args.batch),
           "--seq", str(args.seq), "--dtype", args.dtype, "--attn", args.attn, "--device", args.device]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{impl} on {weights} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", default=list(DEFAULT_CASES), help="names as in train.bench_models")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field of every case")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    import models
    from train.bench_models import case, transformers_modes, with_settings

    print(f"peak memory of one forward + backward step above the weights' level, B={args.batch} S={args.seq}, "
          f"{args.dtype}, {args.attn}, {args.device}")
    for name in args.case:
        values = with_settings(case(name), args.set)
        if values.get("is_moe"):
            values["router_layout"] = "transformers"  # the same maths on both sides
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            models.build(values).save_pretrained(tmp)
            ours = measure("ours", tmp, args)
            row = [f"{name:<16} weights {ours['weights'] / MiB:7.0f} MiB   ours {ours['peak'] / MiB:7.0f} MiB"]
            for mode in transformers_modes(values):
                theirs = measure(mode, tmp, args)
                row.append(f"{mode} {theirs['peak'] / MiB:7.0f} MiB (ours/theirs {ours['peak'] / theirs['peak']:4.2f}x)")
        print("   ".join(row), flush=True)


if __name__ == "__main__":
    main()
