"""Training throughput and MFU of one model under each parallel layout, on this machine.

    python -m train.bench_parallel [--model doge-20m] [--seq 256] [--steps 12] [--layouts single ddp zero2]

Runs the real entry point (`python -m train`, under torchrun with 2 ranks for ddp / zeroN) on the
built-in corpus with the same global batch, and prints tokens/s and MFU (median over the logged steps
after the first two), and each layout's tokens/s as a ratio of the single process's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(layout: str, args, out: Path) -> dict:
    overrides = [
        f"model={args.model}", f"data.seq_len={args.seq}", f"trainer.max_steps={args.steps}",
        f"trainer.global_batch_size={args.batch}", f"trainer.micro_batch_size={args.batch // 2}",
        "trainer.log_every=1", "trainer.progress=false", "trainer.save_every=0", f"trainer.output_dir={out}",
        f"data.tokenizer.vocab_size={args.vocab}", "trainer.eval_every=0",
    ]
    if layout == "single":
        cmd = [sys.executable, "-m", "train", *overrides]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
               *overrides, f"parallel={layout}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{layout} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    return {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="doge-20m")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch in rows")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32768, help="BPE vocabulary (<= the model's)")
    parser.add_argument("--layouts", nargs="+", default=["single", "ddp", "zero2"])
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts:
            results[layout] = run(layout, args, Path(tmp) / layout)
            r = results[layout]
            base = results.get("single", r)["tokens_per_sec"]
            print(f"{args.model} {layout:<8} seq {args.seq} x {args.batch} rows: {r['tokens_per_sec']:8.0f} tokens/s  "
                  f"MFU {100 * r['mfu']:5.1f}%  ({r['tokens_per_sec'] / base:.2f}x single)", flush=True)


if __name__ == "__main__":
    main()
