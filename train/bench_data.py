"""Data loader throughput next to training throughput, on this machine.

    python -m train.bench_data [--seconds 20] [--seq 512] [--workers 0]

Writes the built-in corpus (the Python standard library's sources, real text) to local parquet
shards in the hub's layout, then measures tokens/s of stream -> tokenize -> pack -> batch through
`datasets` in one process, and the forward+backward+AdamW tokens/s of doge-20m on the same
sequence length. The loader must never be the bottleneck: the ratio says by how much it is not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

import models
from data import DataConfig, EvalConfig, HeldOut, SourceConfig, TokenizerConfig, TokenLoader, build_tokenizer
from data.sources import stdlib_files

REPO = Path(__file__).resolve().parents[1]


def write_parquet_corpus(root: Path, shards: int = 8) -> None:
    files = stdlib_files()
    (root / "stdlib").mkdir(parents=True)
    for i in range(shards):
        texts = [Path(f).read_bytes().decode("utf-8", "replace") for f in files[i::shards]]
        pq.write_table(pa.table({"text": texts}), root / "stdlib" / f"train-{i:05d}-of-{shards:05d}.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: stdlib\n  data_files:\n  - split: train\n    path: stdlib/train-*\n---\n"
    )


def loader_tokens_per_second(root: Path, seq: int, workers: int, seconds: float) -> float:
    cfg = DataConfig(
        sources=[SourceConfig("stdlib", str(root), config="stdlib")],
        tokenizer=TokenizerConfig("bpe", vocab_size=32768, train_bytes=20_000_000),
        seq_len=seq, batch_size=8, num_workers=workers, eval=EvalConfig(holdout_documents=16),
    )
    heldout = HeldOut(cfg)
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.sources, heldout.exclude)
    loader = iter(TokenLoader(cfg, tokenizer, heldout=heldout))
    next(loader)  # start-up (workers, first reads) is not throughput
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(loader)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def training_tokens_per_second(seq: int, steps: int = 4) -> float:
    values = yaml.safe_load((REPO / "configs" / "model" / "doge-20m.yaml").read_text())
    model = models.build(values)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, values["vocab_size"], (2, seq))

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * ids.numel() / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_parquet_corpus(Path(tmp))
        loader = loader_tokens_per_second(Path(tmp), args.seq, args.workers, args.seconds)
    train = training_tokens_per_second(args.seq)
    print(f"loader (local parquet -> tokenize -> pack, {args.workers} workers): {loader:10.0f} tokens/s")
    print(f"training doge-20m (fp32, seq {args.seq}, batch 2, {torch.get_num_threads()} threads): {train:10.0f} tokens/s")
    print(f"loader / training = {loader / train:.0f}x")


if __name__ == "__main__":
    main()
