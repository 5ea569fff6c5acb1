"""Where documents come from: hub datasets (smollm-corpus and any other), local directories in the
hub's layout, local files (parquet, jsonl, txt; globs), pre-tokenized shards, and a built-in corpus
that every machine already has (the Python standard library's sources).

Every text source is read through `datasets` streaming, so a local replica in the hub's layout runs
exactly the code path the hub does. A `DocumentStream` is one source as seen by one node (a data-
parallel rank × a loader worker): endless over epochs, with a small `state_dict()` that resumes at the
exact next document.
"""

from __future__ import annotations

import atexit
import copy
import functools
import glob
import hashlib
import logging
import os
import sysconfig
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

logger = logging.getLogger(__name__)

BUILTIN_PYTHON_STDLIB = "builtin:python-stdlib"
_OPEN_STREAMS: "weakref.WeakSet[DocumentStream]" = weakref.WeakSet()
FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".md": "text"}


class DataError(ValueError):
    """Bad data configuration or input; the message names the source and the fix."""


@dataclass
class SourceConfig:
    """One corpus in a mixture.

    path: a hub dataset id (`HuggingFaceTB/smollm-corpus`), a local directory in the hub's layout, local
      files (a path or glob, or a list of them), a directory written by `python -m data.pretokenize`, or
      `builtin:python-stdlib`.
    data_dir: a local copy of the hub dataset `path` (its layout: `<data_dir>/<config>/*.parquet`, with or
      without the hub's README.md), read instead of the hub.
    config / split: the hub config (e.g. `cosmopedia-v2`) and split.
    text_column: the column holding the text.
    weight: mixture weight (normalised over sources; 0 drops the source: it is never opened).
    fetch: `softwareheritage` for rows that carry only a `blob_id` (smollm-corpus python-edu).
    """

    name: str
    path: Any
    config: Optional[str] = None
    split: str = "train"
    text_column: str = "text"
    weight: float = 1.0
    fetch: Optional[str] = None
    data_format: Optional[str] = None  # files only: parquet | json | text (default: from the extension)
    data_dir: Optional[str] = None

    @property
    def needed_column(self) -> str:
        return "blob_id" if self.fetch else self.text_column


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()


def doc_hash(doc) -> bytes:
    """Content hash of a document: its text, or its token ids (pre-tokenized sources)."""
    if isinstance(doc, str):
        return text_hash(doc)
    return hashlib.blake2b(np.asarray(doc).tobytes(), digest_size=8).digest()


# ---------------------------------------------------------------------------------------------------
# Opening a source as a datasets IterableDataset


def _configure_datasets() -> None:
    import datasets

    # datasets 5.2 sleeps 5 s whenever a stream's iterator is dropped; nothing needs that wait here.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def stdlib_files() -> list[str]:
    """The standard library's .py files in a fixed pseudo-random order (by a hash of the relative path).
    Alphabetical order would stream whole packages in a row (dozens of near-identical codec tables in
    `encodings/`), which is no way to train or to pick held-out documents. Listed once per process (the
    held-out set, the loader and the evaluation batches each open the source; the tree does not change)."""
    return list(_stdlib_files())


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, ...]:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    # os.walk, pruned, not Path.rglob then filter: the interpreter's own site-packages sits inside the
    # standard library's tree, and walking it cost 0.6 s in every process here (the walk alone takes 20 ms).
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in skip]
        files.extend(os.path.join(directory, n) for n in names if n.endswith(".py"))
    return tuple(sorted(files, key=lambda p: hashlib.sha256(os.path.relpath(p, root).encode()).digest()))


def _read_files(paths: list[str]):
    for path in paths:
        # Some files on a normal machine are not UTF-8: keep them, with replacement characters.
        yield {"text": Path(path).read_bytes().decode("utf-8", errors="replace"), "path": path}


def _file_list(path: Any, name: str) -> list[str]:
    patterns = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(str(pattern), recursive=True))
        if not matched:
            raise DataError(f"source {name!r}: no files match {pattern!r}; set its path (data.sources.N.path=...) to "
                            f"files, a glob (quoted: 'DIR/*.parquet'), a directory or a hub dataset id")
        files.extend(m for m in matched if Path(m).is_file())
    return files


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not Path(text).exists()


# Where the data presets take a local copy of a hub dataset from (configs/data/smollm.yaml), for hints.
LOCAL_COPY_KEYS = {"HuggingFaceTB/smollm-corpus": "data.smollm_corpus_dir", "HuggingFaceTB/finemath": "data.finemath_dir"}


def _local_copy_hint(cfg: SourceConfig) -> str:
    key = LOCAL_COPY_KEYS.get(str(cfg.path))
    preset = f" (data=smollm: {key}=DIR)" if key else ""
    folder = f" --include '{cfg.config}/*'" if cfg.config else ""
    return (f"Offline? Download it where the hub is reachable (`hf download {cfg.path} --repo-type dataset{folder} "
            f"--local-dir DIR`) and set this source's data_dir=DIR{preset}, or point `path` at local files.")


def _probe_hub(cfg: SourceConfig) -> None:
    """Fail in seconds, not after datasets' ~25 s of retries, when the hub cannot be reached."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # datasets then fails at once with OfflineModeIsEnabled (or uses its cache)
    try:
        huggingface_hub.HfApi().dataset_info(cfg.path, timeout=10)
    except Exception as exc:  # no network, DNS, 404, auth
        raise DataError(
            f"dataset {cfg.path!r}: cannot reach it on the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). {_local_copy_hint(cfg)}"
        ) from exc


def _readme_configs(directory: Path) -> Optional[list[str]]:
    """The config names a hub-layout README.md lists in its YAML header (None: no README or no list)."""
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    header = text[3:].split("\n---", 1)[0]
    try:
        import yaml

        meta = yaml.safe_load(header) or {}
    except Exception:  # a README we cannot parse is no list of configs; the folders still are
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list):
        return None
    return [c.get("config_name") for c in configs if isinstance(c, dict)]


def _hub_layout_files(directory: Path, cfg: SourceConfig) -> list[str]:
    """The data files of one config and split of a hub-layout directory that has no README listing it:
    `<directory>/<config>/` (or the directory itself without a config), split by file name the way
    the hub does for repositories without a README (`train-00000-of-00004.parquet` is train)."""
    from datasets.data_files import DataFilesList, get_data_patterns

    folder = directory / cfg.config if cfg.config else directory
    if not folder.is_dir():
        subfolders = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(
            f"source {cfg.name!r}: {directory} has no folder {cfg.config!r} (its folders: {subfolders}) and no "
            f"README.md listing that config; set config to one of the folders"
        )
    try:
        patterns = get_data_patterns(str(folder))
    except Exception as exc:  # EmptyDatasetError: no data files at all
        raise DataError(f"source {cfg.name!r}: no data files in {folder}") from exc
    splits = {str(k): v for k, v in patterns.items()}
    if cfg.split not in splits:
        raise DataError(f"source {cfg.name!r}: {folder} has no files of split {cfg.split!r} (splits by file name: "
                        f"{sorted(splits)}); set split to one of them")
    files = [str(f) for f in DataFilesList.from_patterns(splits[cfg.split], base_path=str(folder))]
    files = sorted(f for f in files if Path(f).suffix in FILE_FORMATS)
    if not files:
        raise DataError(f"source {cfg.name!r}: no parquet, jsonl or txt files of split {cfg.split!r} in {folder}")
    return files


def _parquet_columns(files: list[str], cfg: SourceConfig) -> Optional[list[str]]:
    """The columns to read from parquet files: only the one the source needs, when every file has it
    (then other columns may differ between files, as they do between dumps of one corpus). Files that
    lack it are an error naming them, read from the footers before any data is."""
    import pyarrow.parquet as pq

    needed = cfg.needed_column
    schemas = {}
    for f in files:
        try:
            schemas[f] = pq.read_schema(f).names
        except Exception as exc:
            raise DataError(f"source {cfg.name!r}: {f} is not a readable parquet file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    lacking = [f for f, names in schemas.items() if needed not in names]
    if not lacking:
        return [needed]
    if len(lacking) == len(files):
        return None  # no file has it: open_dataset names the column and the file's columns
    having = [f for f in files if f not in lacking]
    common = sorted(set.intersection(*(set(n) for n in schemas.values())))
    shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
    raise DataError(
        f"source {cfg.name!r}: the files have different columns: {len(lacking)} of {len(files)} lack column "
        f"{needed!r} ({shown}: columns {schemas[lacking[0]]}), the others have it (e.g. {having[0]}: columns "
        f"{schemas[having[0]]}). Give one source per kind of file (data.sources.N.path for each, with its own "
        f"text_column), or set text_column to a column every file has ({common or 'there is none'})."
    )


def _open_files(files: list[str], cfg: SourceConfig):
    import datasets

    formats = {cfg.data_format or FILE_FORMATS.get(Path(f).suffix) for f in files}
    if None in formats or len(formats) != 1:
        raise DataError(
            f"source {cfg.name!r}: cannot tell one file format for {cfg.path!r} (extensions give {formats}); "
            f"set data_format to parquet, json or text"
        )
    builder = formats.pop()
    extra = {}
    if builder == "parquet":
        columns = _parquet_columns(files, cfg)
        if columns is not None:
            extra["columns"] = columns
    if builder in ("text", "json"):
        # Some files on a normal machine are not UTF-8: keep them, with replacement characters.
        extra["encoding_errors"] = "replace"
    if builder == "json":
        # datasets' json reader applies encoding_errors only when the encoding is not spelled
        # "utf-8" (otherwise pyarrow takes the raw bytes and fails later on invalid UTF-8);
        # "utf_8" is the same codec under another name, which routes it through the decode.
        extra["encoding"] = "utf_8"
    if builder == "text":
        extra["sample_by"] = "document"  # one document per file, not per line
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra)


def open_dataset(cfg: SourceConfig):
    """The source as a streaming `datasets.IterableDataset` with a `text` column (or `blob_id`)."""
    _configure_datasets()
    import datasets

    path = cfg.path
    if cfg.data_dir is not None:
        if not Path(cfg.data_dir).is_dir():
            raise DataError(
                f"source {cfg.name!r}: data_dir {cfg.data_dir!r} is not a directory; point it at a local copy of "
                f"{path!r} in the hub's layout (<data_dir>/{cfg.config or '<config>'}/*.parquet)"
            )
        path = cfg.data_dir
    try:
        if path == BUILTIN_PYTHON_STDLIB:
            files = stdlib_files()
            # a list in gen_kwargs is split into shards: one per file, so nodes split by file
            ds = datasets.IterableDataset.from_generator(_read_files, gen_kwargs={"paths": files})
        elif isinstance(path, str) and Path(path).is_dir():
            listed = _readme_configs(Path(path))
            if listed is not None and (cfg.config in listed or (cfg.config is None and listed)):
                # the hub's own description of the configs: exactly what the hub would serve
                ds = datasets.load_dataset(path, cfg.config, split=cfg.split, streaming=True)
            else:
                ds = _open_files(_hub_layout_files(Path(path), cfg), cfg)
        elif isinstance(path, str) and _is_hub_id(path):
            _probe_hub(cfg)
            ds = datasets.load_dataset(path, cfg.config, split=cfg.split, streaming=True)
        else:
            ds = _open_files(_file_list(path, cfg.name), cfg)
    except DataError:
        raise
    except Exception as exc:
        where = f"{path!r}" + (f" config {cfg.config!r}" if cfg.config else "") + f" split {cfg.split!r}"
        hint = _local_copy_hint(cfg) if isinstance(cfg.path, str) and _is_hub_id(cfg.path) and cfg.data_dir is None \
            else "Offline? Point `path` at a local directory in the hub's layout or at local files."
        raise DataError(
            f"source {cfg.name!r}: could not open {where} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}). {hint}"
        ) from exc
    columns = ds.column_names
    needed = cfg.needed_column
    if columns is not None and needed not in columns:
        hint = " (smollm-corpus python-edu has only blob ids: set fetch: softwareheritage)" if "blob_id" in columns else ""
        raise DataError(
            f"source {cfg.name!r}: column {needed!r} not in {columns}; set text_column to one of them{hint}"
        )
    return ds


def split_for_node(ds, node: int, num_nodes: int):
    """Node `node` of `num_nodes` (ranks × workers). Whole shards per node when there are enough
    (no node reads another's files; counts differ by at most one shard); otherwise every
    num_nodes-th document. Either way the nodes partition the stream: nothing twice, nothing dropped."""
    if num_nodes == 1:
        return ds
    if ds.num_shards >= num_nodes:
        return ds.shard(num_shards=num_nodes, index=node, contiguous=False)
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(ds, rank=node, world_size=num_nodes)


# ---------------------------------------------------------------------------------------------------
# One source as seen by one node


@dataclass
class StreamStats:
    documents: int = 0
    skipped_empty: int = 0
    skipped_heldout: int = 0
    skipped_fetch: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def admit(self, doc, exclude) -> bool:
        """Whether a document is trained on; skips (unfetchable, empty or whitespace-only, held out
        for evaluation) are counted."""
        if doc is None:
            self.skipped_fetch += 1
            return False
        if not doc.strip() if isinstance(doc, str) else len(doc) == 0:
            self.skipped_empty += 1
            return False
        if exclude and doc_hash(doc) in exclude:
            self.skipped_heldout += 1
            return False
        self.documents += 1
        return True


def no_usable_document(cfg: SourceConfig, node: int, num_nodes: int, workers_per_rank: int, this_pass: dict,
                       holdout_documents: Optional[int] = None, total_documents: Optional[int] = None) -> DataError:
    """The error for a node that got no usable document in a whole pass over its part of a source,
    naming the cause from the pass's counts (`this_pass`: StreamStats fields counted over the pass)."""
    rows = sum(this_pass[k] for k in ("documents", "skipped_empty", "skipped_heldout", "skipped_fetch"))
    ranks = max(1, num_nodes // max(1, workers_per_rank))
    nodes = (f"{num_nodes} = {ranks} rank{'s' if ranks != 1 else ''} x {workers_per_rank} loader "
             f"worker{'s' if workers_per_rank != 1 else ''}")
    who = f"node {node} of {num_nodes}" if num_nodes > 1 else "it"
    held = f"data.eval.holdout_documents={holdout_documents}" if holdout_documents is not None else "data.eval.holdout_documents"
    if rows == 0 and num_nodes == 1:
        cause = "the source has no documents at all (no rows); check its path and split"
    elif rows == 0 and total_documents is not None and total_documents < num_nodes:
        cause = (f"the source has fewer documents ({total_documents}) than nodes ({nodes}), so node {node} has none; "
                 f"use fewer ranks or loader workers (data.num_workers), or more data")
    elif rows == 0:
        cause = (f"the shards (files) node {node} was given hold no rows (nodes: {nodes}); remove empty files, or use "
                 f"fewer ranks or loader workers (data.num_workers)")
    elif this_pass["skipped_heldout"] == rows:
        cause = (f"all {rows} documents {who} read were held out for evaluation ({held}: the first documents of each "
                 f"source); lower data.eval.holdout_documents, or give separate data.eval.sources")
    elif this_pass["skipped_fetch"] == rows:
        cause = (f"all {rows} documents {who} read failed to fetch (fetch: {cfg.fetch}); check the network, use a "
                 f"local copy with a {cfg.text_column!r} column, or set the source's weight to 0")
    elif this_pass["skipped_empty"] == rows:
        cause = (f"all {rows} documents {who} read were empty or whitespace-only; check text_column "
                 f"({cfg.text_column!r})")
    else:
        cause = (f"none of the {rows} documents {who} read is usable: {this_pass['skipped_empty']} empty or "
                 f"whitespace-only, {this_pass['skipped_heldout']} held out for evaluation ({held}), "
                 f"{this_pass['skipped_fetch']} failed to fetch")
    where = f"node {node} of {num_nodes}" if num_nodes > 1 else "the source"
    return DataError(f"source {cfg.name!r}: {where} got no usable document in a whole pass: {cause}")


def pass_counts(stats: StreamStats, pass_start: dict) -> dict:
    return {k: v - pass_start.get(k, 0) for k, v in stats.as_dict().items()}


@dataclass(eq=False)
class DocumentStream:
    """Batches of documents (str, or token arrays for pre-tokenized sources) from one source for one
    node, endless over epochs. `state_dict()` records where the current read batch started and how
    many of its documents were handed out, so a resumed stream re-reads that batch and continues at
    the exact next document."""

    cfg: SourceConfig
    node: int = 0
    num_nodes: int = 1
    read_batch: int = 64
    exclude: set = field(default_factory=set)  # text hashes held out for evaluation
    endless: bool = True
    fetcher: Any = None
    workers_per_rank: int = 1  # for error messages: nodes = ranks x loader workers
    holdout_documents: Optional[int] = None  # for error messages: data.eval.holdout_documents

    def __post_init__(self):
        self._ds = None
        self.epoch = 0
        self.stats = StreamStats()
        self._pass_start = self.stats.as_dict()  # the counters when this pass began
        self._batch_start_state = None  # dataset state before the current batch (None: epoch start)
        self._pending: list = []  # documents of the current batch not yet handed out
        self._consumed = 0  # documents of the current batch handed out (or skipped)
        self._documents_this_epoch = 0
        self._iter = None
        self._start_epoch(None)
        _OPEN_STREAMS.add(self)

    # -- reading
    def _start_epoch(self, dataset_state) -> None:
        self.close()
        # A fresh dataset object per pass (not a deepcopy: a streaming dataset holds filesystem
        # handles that background threads may be updating).
        self._ds = split_for_node(open_dataset(self.cfg), self.node, self.num_nodes)
        self._ds.set_epoch(self.epoch)
        if dataset_state is not None:
            self._ds.load_state_dict(dataset_state)
        self._iter: Iterator = self._ds.iter(batch_size=self.read_batch)
        self._start_state = dataset_state
        self._fresh = True  # nothing read from this iterator yet

    def _read_batch(self) -> bool:
        """Load the next batch of documents into `_pending`; False when the epoch has ended."""
        # datasets' state after the previous batch is this batch's start (its state is only set up
        # once an iterator has yielded, hence `_fresh`)
        state_before = copy.deepcopy(self._start_state) if self._fresh else self._ds.state_dict()
        try:
            batch = next(self._iter)
        except StopIteration:
            return False
        except Exception as exc:
            from datasets.table import CastError

            if not isinstance(exc, CastError):
                raise
            # files whose columns differ (parquet files are checked when opened; json ones only here)
            raise DataError(
                f"source {self.cfg.name!r}: its files do not all have the same columns "
                f"({' '.join(str(exc).split())[:300]}). Give one source per kind of file (data.sources.N.path "
                f"for each), or use parquet files, of which only the text column is read."
            ) from None
        self._fresh = False
        self._batch_start_state = state_before
        self._pending = self._documents(batch)
        self._consumed = 0
        return True

    def _documents(self, batch: dict) -> list:
        if self.cfg.fetch:
            texts = self.fetcher.fetch(batch["blob_id"]) if self.fetcher else [None] * len(batch["blob_id"])
        else:
            texts = batch[self.cfg.text_column]
        return list(texts)

    def next_document(self):
        """The next usable document. Empty, whitespace-only, held-out and unfetchable ones are skipped and
        counted. Returns None only for a finite (evaluation) stream that has ended."""
        while True:
            while self._consumed < len(self._pending):
                doc = self._pending[self._consumed]
                self._consumed += 1
                if self.stats.admit(doc, self.exclude):
                    self._documents_this_epoch += 1
                    return doc
            if self._read_batch():
                continue
            if not self.endless:
                return None
            if self._documents_this_epoch == 0:
                this_pass = pass_counts(self.stats, self._pass_start)
                rows = sum(this_pass.values())
                total = self._count_documents(self.num_nodes) if rows == 0 and self.num_nodes > 1 else None
                raise no_usable_document(self.cfg, self.node, self.num_nodes, self.workers_per_rank, this_pass,
                                         self.holdout_documents if self.exclude else None, total)
            self.epoch += 1
            self._documents_this_epoch = 0
            self._pass_start = self.stats.as_dict()
            # per node (rank x loader worker), so many lines for one fact: the run's last lines say which
            # sources repeated and how often, and data/<source>/epoch in metrics.jsonl follows it
            logger.debug("source %s (node %d): epoch %d begins", self.cfg.name, self.node, self.epoch)
            self._pending, self._consumed = [], 0
            self._start_epoch(None)

    def _count_documents(self, limit: int) -> int:
        """Rows of the whole source (all nodes), counted up to `limit`: cheap, for an error message."""
        iterator = open_dataset(self.cfg).iter(batch_size=limit)
        count = 0
        try:
            for batch in iterator:
                count += len(next(iter(batch.values())))
                if count >= limit:
                    break
        finally:
            iterator.close()
        return count

    # -- resume
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_start": copy.deepcopy(self._batch_start_state),
            "consumed": self._consumed,
            "documents_this_epoch": self._documents_this_epoch,
            "stats": self.stats.as_dict(),
            "pass_start": dict(self._pass_start),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.stats = StreamStats(**state["stats"])
        self._pass_start = dict(state.get("pass_start", self.stats.as_dict()))
        self._documents_this_epoch = state["documents_this_epoch"]
        self._start_epoch(state["batch_start"])
        self._pending, self._consumed = [], 0
        consumed = state["consumed"]
        if consumed and self._read_batch():
            # the documents of this batch that were handed out before the checkpoint
            self._consumed = consumed
        elif consumed:
            raise DataError(f"source {self.cfg.name!r}: cannot resume: the saved read position is past the data")

    def close(self) -> None:
        # Drop a half-read parquet iterator while pyarrow is still loaded (at interpreter exit it
        # prints "Exception ignored ... ArrowInvalid" noise).
        close = getattr(self._iter, "close", None)
        self._iter = None
        if close:
            close()


@atexit.register
def _close_open_streams() -> None:
    for stream in list(_OPEN_STREAMS):
        stream.close()
