"""Documents -> token rows: mixture, tokenization, packing, shuffling, sharding, exact resume.

    sources --(mixture by tokens or documents)--> tokenize (batched) + EOS --> pack into rows of
    seq_len + 1 tokens (consecutive rows overlap by one token, so every token is a target once)
    --> shuffle buffer --> batches {input_ids, shift_labels[, position_ids]}

Work is split over nodes = data-parallel ranks × loader workers. Each node owns a disjoint part of
every source (`sources.split_for_node`) and runs its own mixture and packer (`PackedRows`) inside a
DataLoader worker (or in-process with num_workers=0). Workers hand over chunks of rows together with
their small state; the main process keeps the shuffle buffer and the last state received from each
worker, so `TokenLoader.state_dict()` is cheap and a resumed loader yields exactly the batches an
uninterrupted one would have. The held-out evaluation stream is in `heldout.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Protocol

import numpy as np
import torch

from .pretokenize import PretokenizedStream, is_pretokenized
from .sources import DataError, DocumentStream, SourceConfig
from .tokenizer import TextTokenizer, TokenizerConfig, default_cache_dir

logger = logging.getLogger(__name__)


class Exclusions(Protocol):
    """What the loader needs of the held-out set (heldout.HeldOut): the hashes of documents it must skip.
    A protocol, so that this module does not import heldout.py, which builds on it."""

    exclude: set


# Per source, what `TokenLoader.counters()` reports: tokens trained (exact), documents read, documents
# skipped (empty or whitespace-only, held out for evaluation, failed to fetch), and the epoch (passes
# begun over the source's data). Every field adds up over workers and ranks except `epoch`: a maximum.
COUNTER_FIELDS = ("tokens", "documents", "skipped_empty", "skipped_heldout", "skipped_fetch", "epoch")


@dataclass
class EvalConfig:
    """The held-out evaluation stream. By default the first `holdout_documents` documents of each
    training source are held out (training skips them, by content hash); or give separate `sources`
    (another split, shard or file)."""

    holdout_documents: int = 64
    sources: Optional[list[SourceConfig]] = None
    max_batches: int = 8


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 256
    batch_size: int = 8  # rows per micro-batch, per rank
    mixture_by: str = "tokens"  # tokens | documents
    shuffle_buffer: int = 256  # rows held by the main process for shuffling (0: none)
    document_masking: bool = False  # reset positions and block attention at document starts
    num_workers: int = 0  # DataLoader worker processes per rank (0: in-process)
    read_batch: int = 64  # documents read and tokenized at a time
    seed: int = 0
    allow_new_order: bool = False  # on resume with another world size: start a fresh data order
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.mixture_by not in ("tokens", "documents"):
            raise DataError(f"data.mixture_by={self.mixture_by!r}; choose tokens or documents")
        if self.seq_len < 1 or self.batch_size < 1:
            raise DataError(f"data.seq_len and data.batch_size must be >= 1 (got {self.seq_len}, {self.batch_size})")
        if not self.sources:
            raise DataError("data.sources is empty: give at least one source")
        names = [s.name for s in self.sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # counters and resume states are kept by source name
            raise DataError(f"data.sources: the names {repeated} are used twice; give every source its own name")


def mixture_weights(sources: list[SourceConfig]) -> tuple[list[SourceConfig], list[float]]:
    """Sources with a positive weight and their weights normalised to sum to 1. A negative weight is an
    error; a zero weight drops the source (so an override can switch one off). Silent: every loader
    node, the held-out set and the tokenizer ask for it; `log_mixture` says it once per run."""
    for s in sources:
        if s.weight < 0:
            raise DataError(f"source {s.name!r}: weight {s.weight} is negative; weights must be >= 0")
    kept = [s for s in sources if s.weight > 0]
    if not kept:
        raise DataError("every source has weight 0: give at least one a positive weight")
    total = sum(s.weight for s in kept)
    return kept, [s.weight / total for s in kept]


def log_mixture(sources: list[SourceConfig]) -> None:
    """The mixture as the run uses it: the sources left out (weight 0) and, when the weights do not sum
    to 1, the normalised weights. The trainer calls it once, on rank 0."""
    kept, weights = mixture_weights(sources)
    dropped = [s.name for s in sources if s.weight == 0]
    if dropped:
        logger.info("sources with weight 0 are left out: %s", dropped)
    if abs(sum(s.weight for s in kept) - 1.0) > 1e-6 and len(kept) > 1:
        logger.info("mixture weights normalised to %s", {s.name: round(w, 4) for s, w in zip(kept, weights)})


def open_stream(source: SourceConfig, node=0, num_nodes=1, read_batch=64, exclude=frozenset(), endless=True, fetcher=None,
                workers_per_rank=1, holdout_documents=None):
    """The right stream for a source: pre-tokenized shards, or text through `datasets`."""
    if is_pretokenized(source.path):
        return PretokenizedStream(source, node, num_nodes, read_batch, set(exclude), endless,
                                  workers_per_rank=workers_per_rank, holdout_documents=holdout_documents)
    if source.fetch is not None and fetcher is None:
        if source.fetch != "softwareheritage":
            raise DataError(f"source {source.name!r}: fetch={source.fetch!r}; the only fetcher is softwareheritage")
        from .swh import SoftwareHeritageFetcher

        fetcher = SoftwareHeritageFetcher(default_cache_dir() / "softwareheritage")
    return DocumentStream(source, node, num_nodes, read_batch, set(exclude), endless, fetcher, workers_per_rank,
                          holdout_documents)


# ---------------------------------------------------------------------------------------------------
# One node: mixture + tokenization + packing


class PackedRows:
    """Rows of `seq_len + 1` tokens for one node. Its state is small: per source, where the current
    read batch started and how much of it was used (re-read and re-tokenized on resume), the mixture
    counters, and the packing remainder (< one row)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: TextTokenizer,
        node: int = 0,
        num_nodes: int = 1,
        exclude: set = frozenset(),
        fetcher=None,
        workers_per_rank: int = 1,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.sources, self.weights = mixture_weights(cfg.sources)
        self.streams = [
            open_stream(s, node, num_nodes, cfg.read_batch, exclude, fetcher=fetcher, workers_per_rank=workers_per_rank,
                        holdout_documents=cfg.eval.holdout_documents)
            for s in self.sources
        ]
        for stream in self.streams:
            if isinstance(stream, PretokenizedStream):
                stream.check_tokenizer(tokenizer)
        n = len(self.sources)
        self.count = [0] * n  # tokens or documents taken from each source (for the mixture)
        self._queue: list[list] = [[] for _ in range(n)]  # tokenized documents ready to pack
        self._pull: list[dict] = [{"before": None, "pulled": 0, "used": 0} for _ in range(n)]
        self._tokens = np.empty(0, dtype=np.int32)
        self._starts = np.empty(0, dtype=bool)  # True at the first token of a document
        self._source = np.empty(0, dtype=np.int8)

    # -- documents
    def _refill(self, i: int) -> None:
        """Read and tokenize the next batch of documents of source i (one tokenizer call)."""
        stream = self.streams[i]
        before = stream.state_dict()
        docs = [stream.next_document() for _ in range(self.cfg.read_batch)]
        self._pull[i] = {"before": before, "pulled": len(docs), "used": 0}
        self._queue[i] = self._tokenize(docs)

    def _tokenize(self, docs: list) -> list[np.ndarray]:
        texts = [d for d in docs if isinstance(d, str)]
        encoded = iter(self.tokenizer.encode_batch(texts)) if texts else iter(())
        out = []
        for d in docs:
            ids = np.asarray(next(encoded) if isinstance(d, str) else d, dtype=np.int32)
            out.append(np.append(ids, np.int32(self.tokenizer.eos_id)))
        return out

    def _next_source(self) -> int:
        # Deterministic weighted scheduling: the source furthest below its share goes next, so the
        # token (or document) shares track the weights closely at every point of the stream.
        return min(range(len(self.weights)), key=lambda i: (self.count[i] / self.weights[i], i))

    def _append_document(self) -> None:
        i = self._next_source()
        if self._pull[i]["used"] >= len(self._queue[i]):
            self._refill(i)
        doc = self._queue[i][self._pull[i]["used"]]
        self._pull[i]["used"] += 1
        self.count[i] += len(doc) if self.cfg.mixture_by == "tokens" else 1
        starts = np.zeros(len(doc), dtype=bool)
        starts[0] = True
        self._tokens = np.concatenate([self._tokens, doc])
        self._starts = np.concatenate([self._starts, starts])
        self._source = np.concatenate([self._source, np.full(len(doc), i, dtype=np.int8)])

    # -- rows
    def next_rows(self, n: int) -> dict[str, np.ndarray]:
        width = self.cfg.seq_len + 1
        while len(self._tokens) < self.cfg.seq_len * n + 1:
            self._append_document()
        take = self.cfg.seq_len * n
        index = np.arange(n)[:, None] * self.cfg.seq_len + np.arange(width)[None, :]
        rows = {"tokens": self._tokens[index], "starts": self._starts[index], "source": self._source[index]}
        # the last token of each row is the first of the next (it is a target once, an input once)
        self._tokens, self._starts, self._source = self._tokens[take:], self._starts[take:], self._source[take:]
        return rows

    # -- resume
    def state_dict(self) -> dict:
        return {
            "count": list(self.count),
            "pull": [dict(p) for p in self._pull],
            "tokens": torch.from_numpy(self._tokens.copy()),
            "starts": torch.from_numpy(self._starts.copy()),
            "source": torch.from_numpy(self._source.copy()),
            "streams": [{"epoch": s.epoch, "stats": s.stats.as_dict()} for s in self.streams],
        }

    def load_state_dict(self, state: dict) -> None:
        self.count = list(state["count"])
        for i, pull in enumerate(state["pull"]):
            self._pull[i] = dict(pull)
            self._queue[i] = []
            if pull["before"] is not None:
                stream = self.streams[i]
                stream.load_state_dict(pull["before"])
                docs = [stream.next_document() for _ in range(pull["pulled"])]
                self._queue[i] = self._tokenize(docs)
        self._tokens = state["tokens"].numpy().astype(np.int32)
        self._starts = state["starts"].numpy().astype(bool)
        self._source = state["source"].numpy().astype(np.int8)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def stats(self) -> dict:
        return {s.cfg.name: {"epoch": s.epoch, **s.stats.as_dict()} for s in self.streams}


# ---------------------------------------------------------------------------------------------------
# Rows -> batches


def rows_to_batch(rows: dict[str, np.ndarray], eos_id: int, document_masking: bool) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(rows["tokens"].astype(np.int64))
    batch = {"input_ids": tokens[:, :-1].contiguous(), "shift_labels": tokens[:, 1:].contiguous()}
    if document_masking:
        starts = rows["starts"][:, :-1].copy()
        starts[:, 0] = True  # a row starts a segment (its first document may have begun in the last row)
        index = np.broadcast_to(np.arange(starts.shape[1]), starts.shape)
        segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
        batch["position_ids"] = torch.from_numpy((index - segment_start).astype(np.int64))
        # EOS ends a document: predicting the next document's first token from it is not learnable
        # once attention is blocked across documents
        batch["shift_labels"] = batch["shift_labels"].masked_fill(batch["input_ids"] == eos_id, -100)
    return batch


def _worker_init(worker_id: int) -> None:
    """First thing in every DataLoader worker. A forked worker inherits the `tokenizers` library's
    (Rust, rayon) thread pool without its threads. The library protects such a child only when
    TOKENIZERS_PARALLELISM is unset; when the variable says true and the parent has used the pool
    (BPE training, encoding the held-out documents), the worker's first `encode_batch` waits forever
    on threads that do not exist. The library reads the variable at every call, so turning it off here,
    before any encoding in the worker, is enough: each worker encodes on its own thread (the workers
    are the parallelism), whatever the environment says."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@dataclass
class _WorkerFailure:
    """A DataError in a loader worker, handed to the main process to raise as it is (the DataLoader
    would wrap it in the worker's traceback)."""

    message: str


class _WorkerStreams(torch.utils.data.IterableDataset):
    """Runs one `PackedRows` per DataLoader worker and yields (logical worker, rows, state) chunks."""

    def __init__(self, cfg, tokenizer, rank, world_size, num_logical, offset, states, exclude, chunk_rows, fetcher):
        super().__init__()
        self.args = (cfg, tokenizer, rank, world_size, num_logical, offset, states, exclude, chunk_rows, fetcher)

    def __iter__(self):
        if torch.utils.data.get_worker_info() is None:
            yield from self._chunks()
            return
        try:
            yield from self._chunks()
        except DataError as exc:
            yield _WorkerFailure(str(exc))

    def _chunks(self):
        cfg, tokenizer, rank, world_size, num_logical, offset, states, exclude, chunk_rows, fetcher = self.args
        info = torch.utils.data.get_worker_info()
        logical = ((info.id if info else 0) + offset) % num_logical
        rows = PackedRows(cfg, tokenizer, rank * num_logical + logical, world_size * num_logical, exclude, fetcher,
                          workers_per_rank=num_logical)
        try:
            if states[logical] is not None:
                rows.load_state_dict(states[logical])
            while True:
                chunk = rows.next_rows(chunk_rows)
                yield logical, chunk, rows.state_dict(), rows.stats()
        finally:
            rows.close()


def merge_counters(per_rank: list[dict]) -> dict:
    """`TokenLoader.counters()` of several ranks -> the run's: every field summed, `epoch` the maximum."""
    out: dict[str, dict[str, int]] = {}
    for counters in per_rank:
        for name, values in counters.items():
            entry = out.setdefault(name, dict.fromkeys(COUNTER_FIELDS, 0))
            for key in COUNTER_FIELDS:
                entry[key] = max(entry[key], values[key]) if key == "epoch" else entry[key] + values[key]
    return out


def _no_counts() -> dict:
    return dict.fromkeys(COUNTER_FIELDS[1:], 0)  # documents, skips, epoch (tokens are kept apart, exactly)


class TokenLoader:
    """The training batches of one data-parallel rank, endless, with exact resume.

    Iterating yields {input_ids (B, S), shift_labels (B, S)[, position_ids (B, S)]}, int64.
    `state_dict()` / `load_state_dict()` capture everything needed to continue token for token;
    `counters()` reports per source what was trained, read and skipped."""

    STATE_VERSION = 1

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: TextTokenizer,
        rank: int = 0,
        world_size: int = 1,
        heldout: Exclusions | None = None,
        fetcher=None,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rank, self.world_size = rank, world_size
        self.num_logical = max(1, cfg.num_workers)
        self.exclude = heldout.exclude if heldout is not None else set()
        self.fetcher = fetcher
        self.source_names = [s.name for s in mixture_weights(cfg.sources)[0]]
        self._worker_states: list = [None] * self.num_logical
        self._worker_stats: list = [{} for _ in range(self.num_logical)]
        self._next_worker = 0
        self._rng = np.random.default_rng([cfg.seed, rank])
        self._buffer: dict[str, np.ndarray] | None = None
        self.source_tokens = [0] * len(self.source_names)
        self.batches = 0
        # documents and skips counted before a change of data order (allow_new_order), per source
        self._carried = {name: _no_counts() for name in self.source_names}
        self._started = False

    # -- identity of the data order
    def _fingerprint(self) -> str:
        sources = []
        for s in mixture_weights(self.cfg.sources)[0]:
            entry = asdict(s)
            if entry["data_dir"] is None:
                del entry["data_dir"]  # so that checkpoints from before the field existed still resume
            sources.append(entry)
        spec = {
            "sources": sources,
            "seq_len": self.cfg.seq_len,
            "mixture_by": self.cfg.mixture_by,
            "tokenizer": self.tokenizer.fingerprint,
            "holdout": self.cfg.eval.holdout_documents,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- iteration
    def _chunks(self) -> Iterator:
        dataset = _WorkerStreams(
            self.cfg, self.tokenizer, self.rank, self.world_size, self.num_logical, self._next_worker,
            list(self._worker_states), self.exclude, self.cfg.batch_size, self.fetcher,
        )
        if self.cfg.num_workers == 0:
            yield from dataset
            return
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.num_workers, prefetch_factor=4, persistent_workers=False,
            worker_init_fn=_worker_init,
        )
        yield from loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._started:
            raise RuntimeError("a TokenLoader is iterated once; make a new one (and load its state) to restart")
        self._started = True
        B = self.cfg.batch_size
        capacity = max(self.cfg.shuffle_buffer, B)
        chunks = self._chunks()
        while True:
            while self._buffer is None or len(self._buffer["tokens"]) < capacity:
                item = next(chunks)
                if isinstance(item, _WorkerFailure):
                    raise DataError(item.message)
                logical, rows, state, stats = item
                rows = {k: np.asarray(v) for k, v in rows.items()}  # the DataLoader hands numpy arrays over as tensors
                self._worker_states[logical] = state
                self._worker_stats[logical] = stats
                self._next_worker = (logical + 1) % self.num_logical
                self._buffer = rows if self._buffer is None else {
                    k: np.concatenate([self._buffer[k], rows[k]]) for k in rows
                }
            n = len(self._buffer["tokens"])
            if self.cfg.shuffle_buffer > B:
                picked = self._rng.choice(n, size=B, replace=False)
            else:
                picked = np.arange(B)
            keep = np.ones(n, dtype=bool)
            keep[picked] = False
            batch_rows = {k: v[picked] for k, v in self._buffer.items()}
            self._buffer = {k: v[keep] for k, v in self._buffer.items()}
            counts = np.bincount(batch_rows["source"][:, :-1].reshape(-1), minlength=len(self.source_names))
            self.source_tokens = [a + int(b) for a, b in zip(self.source_tokens, counts)]
            self.batches += 1
            yield rows_to_batch(batch_rows, self.tokenizer.eos_id, self.cfg.document_masking)

    # -- reporting
    def counters(self) -> dict[str, dict[str, int]]:
        """This rank's counters per source, summed over its loader workers: {source name: {field: int}}
        with the fields of COUNTER_FIELDS, for every configured source (weight > 0), in mixture order.
        `tokens` are the tokens of the batches this loader has yielded (exact); the document counts are
        what the workers have read so far (a little ahead of training: rows wait in the shuffle buffer).
        Cheap (no I/O, no collective): fine to call at every logged step. Over ranks, combine them with
        `merge_counters` (sum; `epoch`: max)."""
        out = {}
        for name, tokens in zip(self.source_names, self.source_tokens):
            entry = {"tokens": int(tokens), **self._carried[name]}
            for stats in self._worker_stats:
                _add_counts(entry, stats.get(name))
            out[name] = entry
        return out

    def source_stats(self) -> dict:
        """The same as `counters()` (the name the trainer has used so far)."""
        return self.counters()

    # -- resume
    def state_dict(self) -> dict:
        buffer = self._buffer or {}
        return {
            "version": self.STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_logical,
            "batch_size": self.cfg.batch_size,
            "workers": list(self._worker_states),
            "worker_stats": list(self._worker_stats),
            "next_worker": self._next_worker,
            "rng": self._rng.bit_generator.state,
            "buffer": {k: torch.from_numpy(v.copy()) for k, v in buffer.items()},
            "source_names": list(self.source_names),
            "source_tokens": list(self.source_tokens),
            "batches": self.batches,
            "carried": {name: dict(c) for name, c in self._carried.items()},
        }

    def load_state_dict(self, state: dict, all_ranks: Optional[list[dict]] = None) -> None:
        """Continue from a saved state: this rank's own (`state`) when the layout is the same. After a
        change of world size, loader workers or data config (allowed by data.allow_new_order), the data
        order starts afresh and the counters are carried so that their sum over the new ranks equals
        the saved total: new rank r takes those of old ranks r, r + W, r + 2W, ... (W ranks now). That
        needs `all_ranks`: the saved states in rank order, one entry per saved rank, of which only those
        this rank takes must be there (the others may be None, not loaded); without it, a rank keeps its
        own counters when `state` is its own and starts from zero otherwise (exact when the world grows)."""
        if self._started:
            raise RuntimeError("load_state_dict must come before iterating")
        if state.get("version") != self.STATE_VERSION:
            raise DataError(f"data loader state has version {state.get('version')}, expected {self.STATE_VERSION}")
        same_layout = (
            state["world_size"] == self.world_size
            and state["num_workers"] == self.num_logical
            and state["fingerprint"] == self._fingerprint()
        )
        if not same_layout:
            # Say it in the keys a user sets: data-parallel ranks, and data.num_workers (0 and 1 both
            # give one stream per rank, and a state records only the streams)
            def workers(streams: int) -> str:
                return "data.num_workers=0 or 1" if streams == 1 else f"data.num_workers={streams}"

            what = (
                f"saved with {state['world_size']} data-parallel rank(s), {workers(state['num_workers'])}, data "
                f"fingerprint {state['fingerprint']}; now {self.world_size} data-parallel rank(s), "
                f"data.num_workers={self.cfg.num_workers}, fingerprint {self._fingerprint()}"
            )
            if not self.cfg.allow_new_order:
                raise DataError(
                    f"cannot resume the data stream exactly: {what}. Resume with the same data config, world size and "
                    f"data.num_workers, or set data.allow_new_order=true to start a fresh data order (documents "
                    f"seen before may be seen again)."
                )
            if self.rank == 0:
                logger.warning("data: %s; starting a fresh data order (data.allow_new_order=true)", what)
            self._carry_counters(state, all_ranks)
            self._rng = np.random.default_rng([self.cfg.seed, self.rank, self.batches])
            return
        own = state.get("rank", self.rank)
        if own != self.rank:
            raise DataError(f"data loader state of rank {own} given to rank {self.rank} with the same world size")
        self.source_tokens = list(state["source_tokens"])
        self.batches = state["batches"]
        for name, counts in (state.get("carried") or {}).items():
            if name in self._carried:
                self._carried[name] = dict(counts)
        self._worker_states = list(state["workers"])
        self._worker_stats = list(state["worker_stats"])
        self._next_worker = state["next_worker"]
        self._rng.bit_generator.state = state["rng"]
        buffer = state["buffer"]
        self._buffer = {k: v.numpy() for k, v in buffer.items()} if buffer else None

    def _carry_counters(self, state: dict, all_ranks: Optional[list[dict]]) -> None:
        old_world = state["world_size"]
        if all_ranks is not None:
            if len(all_ranks) != old_world:
                raise DataError(f"{len(all_ranks)} saved data loader states given for a run of {old_world} ranks")
            mine = [s for r, s in enumerate(all_ranks) if r % self.world_size == self.rank]
            if any(s is None for s in mine):
                taken = list(range(self.rank, old_world, self.world_size))
                raise DataError(f"rank {self.rank} carries the data counters of saved ranks {taken}: load their states")
        else:
            # a checkpoint has one state per saved rank; a rank without one is handed rank 0's
            owner = state.get("rank", self.rank if self.rank < old_world else None)
            mine = [state] if owner == self.rank else []
            if self.world_size < old_world and self.rank == 0:
                logger.warning("data: the counters of saved ranks %d-%d are not carried over (only all saved rank "
                               "states together give exact totals)", self.world_size, old_world - 1)
        tokens = dict.fromkeys(self.source_names, 0)
        self.batches = 0
        self._carried = {name: _no_counts() for name in self.source_names}
        dropped = set()
        for saved in mine:
            names = saved.get("source_names")
            if names is None and len(saved["source_tokens"]) == len(self.source_names):
                names = self.source_names  # saved before names were recorded: the same sources, in order
            for name, count in zip(names or [], saved["source_tokens"]):
                if name in tokens:
                    tokens[name] += int(count)
                else:
                    dropped.add(name)
            self.batches += saved["batches"]
            for name, counts in list((saved.get("carried") or {}).items()):
                if name in self._carried:
                    _add_counts(self._carried[name], counts)
            for stats in saved["worker_stats"]:
                for name, counts in stats.items():
                    if name in self._carried:
                        _add_counts(self._carried[name], counts)
        if dropped:
            logger.warning("data: counters of sources no longer configured are dropped: %s", sorted(dropped))
        self.source_tokens = [tokens[name] for name in self.source_names]


def _add_counts(entry: dict, counts: Optional[dict]) -> None:
    """Add a worker's (or a saved) document and skip counts into `entry`; the epoch is a maximum."""
    if not counts:
        return
    for key in ("documents", "skipped_empty", "skipped_heldout", "skipped_fetch"):
        entry[key] += counts.get(key, 0)
    entry["epoch"] = max(entry["epoch"], counts.get("epoch", 0))
