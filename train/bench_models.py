"""Forward+backward throughput of our models against transformers' implementations, on the same
weights and batch, in the same process (interleaved, so machine noise hits both alike).

    python -m train.bench_models                      # the four cases of the performance issue
    python -m train.bench_models --case doge-20m glm4-small --seq 256 --batch 4
    python -m train.bench_models --case glm4-tiny jetmoe-200m     # any configs/model preset too
    python -m train.bench_models --compile --case doge-20m        # ours compiled vs transformers eager
    python -m train.bench_models --case doge-tiny --set vocab_size=32768 --seq 128   # fields overridden

Prints tokens/s of each and the ratio ours / transformers (> 1: we are faster). For MoE models
transformers is timed twice: as it trains (`output_router_logits=True`, which adds its aux loss) and
without its aux loss (the plain forward); ours always computes the aux loss, which training needs.
`--compile` compiles our decoder layers and loss chunk as `trainer.compile=true` does
(train/engines/parallelize.py) in a fresh process with an empty inductor cache (cold), then again in a new
process over the cache the first one left (warm), and reports both compile times (the first step's
time minus a steady step's) and the steady-state ratio against transformers eager.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


def case(name: str) -> dict:
    """The model configs the performance issue measures, by name, or any configs/model preset."""
    if name == "doge-20m-cdmoe":  # the Doge MoE recipe's expert shape on doge-20m
        return {**preset("doge-20m"), "is_moe": True, "num_experts": 16384, "num_experts_per_tok": 64}
    if name == "glm4-small":  # d 256, 8 layers, GLM-4's real 151552-token vocabulary
        return {**preset("glm4-150m"), "vocab_size": 151552, "hidden_size": 256, "intermediate_size": 1024,
                "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
    if name == "jetmoe-small":  # d 256, 8 layers, 8 experts top-2 in attention and MLP
        return {**preset("jetmoe-200m"), "hidden_size": 256, "num_hidden_layers": 8, "num_key_value_heads": 4,
                "kv_channels": 64, "intermediate_size": 512}
    return preset(name)


DEFAULT_CASES = ("doge-20m", "glm4-small", "jetmoe-small", "doge-20m-cdmoe")


def with_settings(values: dict, settings: list[str]) -> dict:
    """`--set key=value` overrides of a case's config fields (values parsed as YAML)."""
    out = dict(values)
    for item in settings or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set vocab_size=32768")
        out[key] = yaml.safe_load(value)
    return out


def has_aux_loss(values: dict) -> bool:
    return bool(values.get("is_moe")) or values["model_type"] == "jetmoe"


def model_pair(values: dict, attn: str, dtype: torch.dtype, directory: str | Path):
    """Ours and transformers' model on the same weights (ours saved to `directory`, loaded by both)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    values = {**values, "attn_implementation": attn}
    if values.get("is_moe"):
        values["router_layout"] = "transformers"  # the same maths on both sides
    ours = models.build(values, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(directory)
        theirs = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attn, dtype=dtype)
    ours.train(), theirs.train()
    return ours, theirs


def train_step(model, ids, **kwargs) -> None:
    """One forward + backward with labels: the objective each implementation trains with."""
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, **kwargs).loss.backward()


def step_time(model, ids, **kwargs) -> float:
    start = time.perf_counter()
    train_step(model, ids, **kwargs)
    return time.perf_counter() - start


def transformers_modes(values: dict) -> dict[str, dict]:
    """transformers' forward arguments for each mode timed: as it trains, and for MoE models also
    without its aux loss."""
    if not has_aux_loss(values):
        return {"transformers": {"use_cache": False}}
    return {"transformers +aux": {"use_cache": False, "output_router_logits": True},
            "transformers no aux": {"use_cache": False, "output_router_logits": False}}


def interleaved(timed: dict, ids, steps: int) -> dict[str, float]:
    """Median tokens/s of each (model, kwargs) entry, timed in turns after one warm-up step each."""
    for model, kwargs in timed.values():
        step_time(model, ids, **kwargs)
    times = {name: [] for name in timed}
    for _ in range(steps):
        for name, (model, kwargs) in timed.items():
            times[name].append(step_time(model, ids, **kwargs))
    return {name: ids.numel() / statistics.median(t) for name, t in times.items()}


def report(label: str, tps: dict[str, float], baseline: str = "ours") -> None:
    parts = [f"{name} {value:8.0f} tok/s" for name, value in tps.items()]
    ratios = [f"{baseline}/{name.removeprefix('transformers').strip() or 'transformers'} "
              f"{tps[baseline] / value:5.2f}x" for name, value in tps.items() if name.startswith("transformers")]
    print(f"{label}  " + "   ".join(parts) + "   " + "   ".join(ratios), flush=True)


def compare(name: str, values: dict, batch: int, seq: int, steps: int, attn: str, dtype: torch.dtype) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = model_pair(values, attn, dtype, tmp)
    ids = torch.randint(0, values["vocab_size"], (batch, seq))
    timed = {"ours": (ours, {}), **{mode: (theirs, kw) for mode, kw in transformers_modes(values).items()}}
    tps = interleaved(timed, ids, steps)
    report(f"{name:<16} {attn:<5} {str(dtype).removeprefix('torch.'):<8} B={batch} S={seq}", tps)
    return tps


def compiled_child(args) -> None:
    """In this (fresh) process: our model compiled as trainer.compile=true does, against transformers
    eager; prints one JSON line."""
    from train.engines.parallelize import apply_compile

    values = with_settings(case(args.case[0]), args.set)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = model_pair(values, args.attn[0], dtype, tmp)
    apply_compile(ours)
    ids = torch.randint(0, values["vocab_size"], (args.batch, args.seq))
    first = step_time(ours, ids)
    mode, kwargs = next(iter(transformers_modes(values).items()))
    tps = interleaved({"ours compiled": (ours, {}), mode: (theirs, kwargs)}, ids, args.steps)
    steady = ids.numel() / tps["ours compiled"]
    print(json.dumps({"compile_seconds": first - steady, "tps": tps}), flush=True)


def compiled(name: str, args) -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            cmd = [sys.executable, "-m", "train.bench_models", "--compiled-child", "--case", name,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--attn", args.attn[0], "--dtype", args.dtype, *(f"--set={item}" for item in args.set or ())]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"compiled {name} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            report(f"{name:<16} {args.attn[0]:<5} compiled, {label} cache: compile {result['compile_seconds']:5.1f} s",
                   result["tps"], baseline="ours compiled")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", "--preset", nargs="+", default=list(DEFAULT_CASES),
                        help=f"named cases ({', '.join(DEFAULT_CASES)}) or configs/model presets")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attn", choices=["sdpa", "eager"], nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field of every case")
    parser.add_argument("--compile", action="store_true", help="ours compiled (cold and warm cache) vs transformers eager")
    parser.add_argument("--compiled-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compiled_child:
        return compiled_child(args)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} steps, "
          f"forward + backward with labels")
    for name in args.case:
        if args.compile:
            compiled(name, args)
            continue
        for attn in args.attn:
            compare(name, with_settings(case(name), args.set), args.batch, args.seq, args.steps, attn, dtype)


if __name__ == "__main__":
    main()
