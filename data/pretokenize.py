"""Pre-tokenized fast path: tokenize a source once into memory-mapped token shards with an index, then
train from them any number of times without tokenizing again.

    python -m data.pretokenize --source builtin:python-stdlib --tokenizer bpe --out tokens/stdlib
    python -m data.pretokenize --source HuggingFaceTB/smollm-corpus --config cosmopedia-v2 \
        --tokenizer SmallDoge/Doge-tokenizer --out tokens/cosmo --max-tokens 1e9

Layout of DIR: `index.json` (format, dtype, tokenizer fingerprint, shards), per shard
`tokens-NNNNN.bin` (uint16 when the vocabulary fits, else uint32; documents back to back, no EOS) and
`offsets-NNNNN.npy` (int64 document boundaries, length documents + 1), and `tokenizer/`.
A source whose `path` is such a directory streams its documents through the same mixture and packer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .sources import DataError, SourceConfig, StreamStats, no_usable_document, pass_counts

logger = logging.getLogger(__name__)

FORMAT = "smolpretrain-tokens"
VERSION = 1


def is_pretokenized(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "index.json").is_file()


def read_index(directory: Path) -> dict:
    try:
        index = json.loads((directory / "index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{directory / 'index.json'}: unreadable ({exc}); run data.pretokenize again") from exc
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{directory / 'index.json'}: not a {FORMAT} v{VERSION} index")
    return index


def write(source: SourceConfig, tokenizer, out: str | os.PathLike, shard_tokens: int = 100_000_000,
          max_tokens: int | None = None, read_batch: int = 256) -> dict:
    """Tokenize `source` (one pass, in order) into `out`; written under a temporary name and renamed."""
    from .sources import DocumentStream

    out = Path(out)
    if out.exists():
        raise DataError(f"{out} exists; remove it or choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    stream = DocumentStream(source, endless=False, read_batch=read_batch)
    shards, tokens, offsets, total = [], [], [0], 0

    def flush():
        if len(offsets) == 1:
            return
        n = len(shards)
        np.concatenate(tokens).astype(dtype).tofile(tmp / f"tokens-{n:05d}.bin")
        np.save(tmp / f"offsets-{n:05d}.npy", np.asarray(offsets, dtype=np.int64))
        shards.append({"tokens": f"tokens-{n:05d}.bin", "offsets": f"offsets-{n:05d}.npy",
                       "num_tokens": int(offsets[-1]), "num_documents": len(offsets) - 1})
        tokens.clear()
        offsets[:] = [0]

    try:
        done = False
        while not done:
            docs = []
            while len(docs) < read_batch and (doc := stream.next_document()) is not None:
                docs.append(doc)
            done = len(docs) < read_batch
            for ids in tokenizer.encode_batch(docs):
                tokens.append(np.asarray(ids, dtype=np.int64))
                offsets.append(offsets[-1] + len(ids))
                total += len(ids)
                if offsets[-1] >= shard_tokens:
                    flush()
                if max_tokens is not None and total >= max_tokens:
                    done = True
                    break
        flush()
    finally:
        stream.close()
    if not shards:
        shutil.rmtree(tmp)
        raise DataError(f"source {source.name!r} gave no documents to tokenize")
    index = {
        "format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name, "tokenizer": tokenizer.fingerprint,
        "tokenizer_name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "num_tokens": total,
        "num_documents": sum(s["num_documents"] for s in shards), "source": {k: str(v) for k, v in vars(source).items()},
        "stats": stream.stats.as_dict(), "shards": shards,
    }
    tokenizer.save(tmp / "tokenizer")
    (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out)
    return index


class PretokenizedStream:
    """Documents (token arrays, memory-mapped) of a pre-tokenized directory for one node: document g
    (numbered across shards) belongs to node g mod num_nodes. Same interface as DocumentStream."""

    def __init__(self, cfg: SourceConfig, node: int = 0, num_nodes: int = 1, read_batch: int = 64,
                 exclude: set = frozenset(), endless: bool = True, fetcher=None, workers_per_rank: int = 1,
                 holdout_documents: int | None = None):
        self.cfg, self.node, self.num_nodes, self.endless = cfg, node, num_nodes, endless
        self.exclude = exclude
        self.workers_per_rank, self.holdout_documents = workers_per_rank, holdout_documents
        directory = Path(cfg.path)
        self.index = read_index(directory)
        dtype = np.dtype(self.index["dtype"])
        self._tokens, self._offsets = [], []
        for shard in self.index["shards"]:
            self._tokens.append(np.memmap(directory / shard["tokens"], dtype=dtype, mode="r"))
            self._offsets.append(np.load(directory / shard["offsets"], mmap_mode="r"))
        self._first_doc = np.cumsum([0] + [s["num_documents"] for s in self.index["shards"]])
        total = int(self._first_doc[-1])
        self._mine = max(0, (total - node + num_nodes - 1) // num_nodes)
        self.epoch, self.cursor = 0, 0
        self.stats = StreamStats()
        self._pass_start = self.stats.as_dict()
        self._documents_this_epoch = 0
        if self._mine == 0:
            raise self._no_usable_document(total)

    def _no_usable_document(self, total: int) -> DataError:
        return no_usable_document(self.cfg, self.node, self.num_nodes, self.workers_per_rank,
                                  pass_counts(self.stats, self._pass_start),
                                  self.holdout_documents if self.exclude else None, total)

    def check_tokenizer(self, tokenizer) -> None:
        if self.index["tokenizer"] != tokenizer.fingerprint:
            raise DataError(
                f"source {self.cfg.name!r}: {self.cfg.path} was tokenized with {self.index['tokenizer_name']} "
                f"(fingerprint {self.index['tokenizer']}), not with the configured tokenizer {tokenizer.name} "
                f"({tokenizer.fingerprint}); tokenize it again or configure that tokenizer"
            )

    def _document(self, g: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first_doc, g, side="right") - 1)
        local = g - self._first_doc[shard]
        start, end = self._offsets[shard][local], self._offsets[shard][local + 1]
        return np.asarray(self._tokens[shard][start:end])

    def next_document(self):
        while True:
            if self.cursor >= self._mine:
                if not self.endless:
                    return None
                if self._documents_this_epoch == 0:  # a whole pass of empty or held-out documents
                    raise self._no_usable_document(int(self._first_doc[-1]))
                self.epoch, self.cursor = self.epoch + 1, 0
                self._pass_start, self._documents_this_epoch = self.stats.as_dict(), 0
            doc = self._document(self.node + self.cursor * self.num_nodes)
            self.cursor += 1
            if self.stats.admit(doc, self.exclude):
                self._documents_this_epoch += 1
                return doc

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "stats": self.stats.as_dict(),
                "pass_start": dict(self._pass_start), "documents_this_epoch": self._documents_this_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.stats = StreamStats(**state["stats"])
        self._pass_start = dict(state.get("pass_start", self.stats.as_dict()))
        # states saved before this was recorded: count the pass as productive (it was, or it would have hung)
        self._documents_this_epoch = state.get("documents_this_epoch", 1)

    def close(self) -> None:
        pass


def main(argv=None) -> None:
    from .tokenizer import TokenizerConfig, build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="hub id, local dir in hub layout, files/glob, or builtin:python-stdlib")
    parser.add_argument("--config", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--tokenizer", default="bpe", help="transformers tokenizer id/path, or bpe")
    parser.add_argument("--vocab-size", type=int, default=8192, help="for --tokenizer bpe")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-tokens", type=float, default=1e8)
    parser.add_argument("--max-tokens", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source = SourceConfig(name="source", path=args.source, config=args.config, split=args.split, text_column=args.text_column)
    tokenizer = build_tokenizer(TokenizerConfig(args.tokenizer, vocab_size=args.vocab_size), [source])
    index = write(source, tokenizer, args.out, int(args.shard_tokens), int(args.max_tokens) if args.max_tokens else None)
    print(f"wrote {index['num_tokens']:,} tokens of {index['num_documents']:,} documents in {len(index['shards'])} "
          f"shard(s) ({index['dtype']}) to {args.out}")


if __name__ == "__main__":
    main()
