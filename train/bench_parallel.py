"""Training throughput and MFU of one model under each parallel layout, on this machine.

    python -m train.bench_parallel [--model doge-20m] [--seq 256] [--steps 12] [--layouts single ddp zero2]
    python -m train.bench_parallel --layouts single pipeline --micro 1            # pipeline, 8 micro-batches
    python -m train.bench_parallel --model jetmoe-tiny --layouts ddp ep ep-zero2    # expert parallelism

Runs the real entry point (`python -m train`, under torchrun with 2 ranks for every layout but
`single`) on the built-in corpus with the same global batch, and prints tokens/s and MFU (median over
the logged steps after the first two), each layout's tokens/s as a ratio of the first layout's, and
what the layout reports about itself: for `pipeline` the measured idle share of each step (bubble and
waiting on the other stage) next to the theoretical bubble (P-1)/(M+P-1) and the parameters of each
stage; for `ep*` the parameters each rank holds. Each layout's peak resident memory per rank (the
kernel's high-water mark of each rank's process over the whole run, the final checkpoint's save
included; `--save-every` adds saves) is printed too: the figure a layout must keep below what a node
has, and what `python -m train.plan` predicts.
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
import time
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
        "trainer.log_every=1", "trainer.progress=false", f"trainer.save_every={args.save_every}",
        f"trainer.output_dir={out}",
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
    proc, peaks = run_with_rank_peaks(cmd, env, REPO)
    if proc.returncode:
        raise SystemExit(f"{layout} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    result = {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in records),
              "mfu": statistics.median(r.get("mfu", float("nan")) for r in records), "peaks": peaks}
    if "pipeline_idle" in records[0]:
        result["idle"] = statistics.median(r["pipeline_idle"] for r in records)
        result["bubble_theory"] = records[0]["pipeline_bubble_theory"]
        result["stages"] = re.findall(r"pipeline stage (\d+): (.*), (\d+) parameters", proc.stderr)
    held = re.search(r"this rank holds (\d+) of (\d+) parameters", proc.stderr)
    if held:
        result["held"] = (int(held.group(1)), int(held.group(2)))
    return result


def run_with_rank_peaks(cmd: list[str], env: dict | None, cwd) -> tuple[subprocess.CompletedProcess, dict[int, int]]:
    """Run `cmd` and follow the peak resident memory of each of its ranks (processes told apart by their
    RANK environment variable; a plain process without a launcher is rank 0): (the finished process,
    {rank: peak bytes}). The peak is the kernel's high-water mark of each process (VmHWM), read 20 times
    a second, so a spike between two readings still counts; where /proc has none, the sampled RSS. A
    rank's own children (a compiler DeepSpeed runs, data workers) inherit RANK: its figure is the
    largest of its processes. `env` None: this process's environment."""
    import psutil

    env = dict(os.environ) if env is None else env
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        peaks, ranks, root_peak = {}, {}, 0
        while proc.poll() is None:
            try:
                processes = [psutil.Process(proc.pid)]
                processes += processes[0].children(recursive=True)
            except psutil.Error:
                processes = []
            for p in processes:  # one process that exits meanwhile must not stop the others' reading
                try:
                    if p.pid not in ranks:
                        rank = p.environ().get("RANK")
                        if rank is None and p.pid != proc.pid:
                            continue  # not a rank, or a launcher's child not yet exec'd into one: look again
                        ranks[p.pid] = int(rank) if rank is not None else 0
                    peak = _high_water_mark(p)
                except (psutil.Error, OSError, ValueError):
                    continue
                if p.pid == proc.pid and ranks[p.pid] == 0 and "RANK" not in env:
                    root_peak = max(root_peak, peak)  # rank 0 only if it is not a launcher (below)
                else:
                    peaks[ranks[p.pid]] = max(peaks.get(ranks[p.pid], 0), peak)
            time.sleep(0.05)
        if not peaks and root_peak:  # no process said RANK: the root process was the run itself
            peaks[0] = root_peak
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()), peaks


def _high_water_mark(process) -> int:
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return process.memory_info().rss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="doge-20m")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch in rows")
    parser.add_argument("--micro", type=int, default=None, help="rows per micro-batch (default: batch / 2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (default: the model's vocab_size)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
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
            print("    peak resident memory: " + ", ".join(f"rank {k} {v / 2**30:.2f} GiB" for k, v in sorted(r["peaks"].items())),
                  flush=True)
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
