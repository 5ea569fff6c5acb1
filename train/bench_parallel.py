"""Training throughput and MFU of one model under each parallel layout, on this machine.

    python -m train.bench_parallel [--model doge-20m] [--seq 256] [--steps 12] [--layouts single ddp zero2]
    python -m train.bench_parallel --layouts single pipeline --micro 1            # pipeline, 8 micro-batches
    python -m train.bench_parallel --model jetmoe-tiny --layouts ddp ep ep-zero2    # expert parallelism

Runs the real entry point (`python -m train`, under torchrun with 2 ranks for every layout but
`single`) on the built-in corpus with the same global batch, and prints tokens/s and MFU (median over
the logged steps after the first two), each layout's tokens/s as a ratio of the first layout's, and
what the layout reports about itself: for `pipeline` the measured idle share of each step (bubble and
waiting on the other stage) next to the theoretical bubble (P-1)/(M+P-1) and the parameters of each
stage; for `ep*` the parameters each rank holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import models

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = {
    "single": [],
    "ddp": ["parallel=ddp"],
    "zero1": ["parallel=zero1"],
    "zero2": ["parallel=zero2"],
    "zero3": ["parallel=zero3"],
    "pipeline": ["parallel=zero1", "parallel.pipeline_stages=2"],
    "ep": ["parallel=ddp", "parallel.expert_parallel=2"],
    "ep-zero2": ["parallel=zero2", "parallel.expert_parallel=2"],
}


def run(layout: str, args, out: Path) -> dict:
    micro = args.micro or args.batch // 2
    overrides = [
        f"model={args.model}", f"data.seq_len={args.seq}", f"trainer.max_steps={args.steps}",
        f"trainer.global_batch_size={args.batch}", f"trainer.micro_batch_size={micro}",
        "trainer.log_every=1", "trainer.progress=false", "trainer.save_every=0", f"trainer.output_dir={out}",
        f"data.tokenizer.vocab_size={args.vocab}", "trainer.eval_every=0", "trainer.plot=false",
        *LAYOUTS[layout],
    ]
    if layout == "single":
        cmd = [sys.executable, "-m", "train", *overrides]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
               *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{layout} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    result = {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in records),
              "mfu": statistics.median(r["mfu"] for r in records)}
    if "pipeline_idle" in records[0]:
        result["idle"] = statistics.median(r["pipeline_idle"] for r in records)
        result["bubble_theory"] = records[0]["pipeline_bubble_theory"]
        result["stages"] = re.findall(r"pipeline stage (\d+): (.*), (\d+) parameters", proc.stderr)
    held = re.search(r"this rank holds (\d+) of (\d+) parameters", proc.stderr)
    if held:
        result["held"] = (int(held.group(1)), int(held.group(2)))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="doge-20m")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch in rows")
    parser.add_argument("--micro", type=int, default=None, help="rows per micro-batch (default: batch / 2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (default: the model's vocab_size)")
    parser.add_argument("--layouts", nargs="+", default=["single", "ddp", "zero2"], choices=sorted(LAYOUTS))
    args = parser.parse_args(argv)
    values = yaml.safe_load((REPO / "configs" / "model" / f"{args.model}.yaml").read_text())
    args.vocab = args.vocab or values["vocab_size"]
    total = models.build(values, device="meta").num_parameters()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts:
            results[layout] = r = run(layout, args, Path(tmp) / layout)
            base = results[args.layouts[0]]["tokens_per_sec"]
            print(f"{args.model} {layout:<9} seq {args.seq} x {args.batch} rows: {r['tokens_per_sec']:8.0f} tokens/s  "
                  f"MFU {100 * r['mfu']:5.1f}%  ({r['tokens_per_sec'] / base:.2f}x {args.layouts[0]})", flush=True)
            if "idle" in r:
                print(f"    pipeline: idle {100 * r['idle']:.1f}% of each step (theoretical bubble "
                      f"{100 * r['bubble_theory']:.1f}%)", flush=True)
                for stage, items, count in r["stages"]:
                    print(f"    stage {stage}: {int(count):,} parameters ({items})", flush=True)
            if layout != "pipeline":
                held = r.get("held", (total, total))
                print(f"    each rank holds {held[0]:,} of {held[1]:,} parameters "
                      f"({held[0] * 4 / 2**20:.2f} MiB in fp32)", flush=True)


if __name__ == "__main__":
    main()
