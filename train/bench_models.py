"""Forward+backward throughput of our models against transformers' implementations, on the same
weights and batch, in the same process (interleaved, so machine noise hits both alike).

    python -m train.bench_models                      # the issue's two cases (dense + 16384-expert MoE)
    python -m train.bench_models --preset glm4-tiny glm4-150m jetmoe-tiny jetmoe-200m --seq 256 --batch 4

Prints tokens/s for each and the ratio ours / transformers (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

import models

REPO = Path(__file__).resolve().parents[1]


def preset(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())


def step_time(model, ids, **kwargs) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    return time.perf_counter() - start


def compare(name: str, values: dict, batch: int, seq: int, steps: int, attn: str, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    values = {**values, "attn_implementation": attn}
    if values.get("is_moe"):
        values["router_layout"] = "transformers"  # the same maths on both sides
    ours = models.build(values, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation=attn, dtype=dtype)
    ours.train(), theirs.train()
    ids = torch.randint(0, values["vocab_size"], (batch, seq))
    # transformers adds the aux loss only when asked; ours always has it for MoE models
    has_aux = bool(values.get("is_moe")) or values["model_type"] == "jetmoe"
    hf_kwargs = {"output_router_logits": has_aux, "use_cache": False}
    step_time(ours, ids), step_time(theirs, ids, **hf_kwargs)  # warm-up
    ours_times, theirs_times = [], []
    for _ in range(steps):
        ours_times.append(step_time(ours, ids))
        theirs_times.append(step_time(theirs, ids, **hf_kwargs))
    tokens = batch * seq
    ours_tps, theirs_tps = tokens / statistics.median(ours_times), tokens / statistics.median(theirs_times)
    print(
        f"{name:<40} {attn:<5} {str(dtype).removeprefix('torch.'):<8} B={batch} S={seq}  "
        f"ours {ours_tps:8.0f} tok/s   transformers {theirs_tps:8.0f} tok/s   ratio {ours_tps / theirs_tps:5.2f}x",
        flush=True,
    )
    return ours_tps / theirs_tps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=None, help="configs/model presets; default: Doge dense + 16384-expert MoE")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attn", choices=["sdpa", "eager"], nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.preset:
        cases = [(name, preset(name)) for name in args.preset]
    else:
        moe = {**preset("doge-20m"), "is_moe": True, "num_experts": 16384, "num_experts_per_tok": 64}
        cases = [("doge-20m (dense)", preset("doge-20m")), ("doge-20m + CDMoE E=16384 k=64", moe)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    for name, values in cases:
        for attn in args.attn:
            compare(name, values, args.batch, args.seq, args.steps, attn, dtype)


if __name__ == "__main__":
    main()
