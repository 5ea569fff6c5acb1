"""Tokenizers: any `transformers` tokenizer (hub id or local folder), or a byte-level BPE trained with
`tokenizers` on the configured corpus and cached, for fully offline runs.

Either way the pipeline encodes with the Rust `tokenizers.Tokenizer` (batched, GIL released), without
special tokens, and appends EOS itself. `save(dir)` writes the files `transformers.AutoTokenizer` loads,
so a checkpoint directory carries its tokenizer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .sources import DataError, DocumentStream, SourceConfig

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


@dataclass
class TokenizerConfig:
    """name_or_path: a transformers tokenizer (hub id or local folder), or `bpe` to train a byte-level
    BPE on the first `train_bytes` of the training sources (cached under `cache_dir`)."""

    name_or_path: str = "bpe"
    vocab_size: int = 8192
    train_bytes: int = 20_000_000
    cache_dir: Optional[str] = None


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMOLPRETRAIN_CACHE", Path.home() / ".cache" / "smolpretrain"))


@dataclass
class TextTokenizer:
    backend: object  # tokenizers.Tokenizer
    eos_id: int
    name: str
    hf_tokenizer: object = None  # the transformers tokenizer, when loaded through transformers
    fingerprint: str = field(default="")

    @property
    def pad_id(self) -> int | None:
        """The padding token's id, when the tokenizer has one."""
        if self.hf_tokenizer is not None:
            return self.hf_tokenizer.pad_token_id
        return self.backend.token_to_id(PAD_TOKEN)

    @property
    def bos_id(self) -> int | None:
        return self.hf_tokenizer.bos_token_id if self.hf_tokenizer is not None else None

    @property
    def vocab_size(self) -> int:
        """Number of token ids in use (base vocabulary plus added tokens): the model must cover it."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    def save(self, directory: str | os.PathLike) -> None:
        """Files `transformers.AutoTokenizer.from_pretrained(directory)` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.hf_tokenizer is not None:
            # a decoder-only model generates after the prompt: batched prompts are padded on the left
            self.hf_tokenizer.padding_side = "left"
            self.hf_tokenizer.save_pretrained(str(directory))
            return
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "bos_token": None,
            "unk_token": None,
            "model_max_length": 1_000_000_000,
            "padding_side": "left",  # a decoder-only model generates after the prompt
            "clean_up_tokenization_spaces": False,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _fingerprint(backend) -> str:
    return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]


def load_pretrained(name_or_path: str) -> TextTokenizer:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:
        raise DataError(
            f"tokenizer {name_or_path!r}: could not load it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}). Offline? Download it elsewhere and pass its "
            f"folder, or use data.tokenizer.name_or_path=bpe to train one on the corpus."
        ) from exc
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer {name_or_path!r}: a fast (Rust) tokenizer is needed; this one is slow-only")
    if hf.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no EOS token, which packing puts between documents")
    return TextTokenizer(backend, hf.eos_token_id, name_or_path, hf_tokenizer=hf, fingerprint=_fingerprint(backend))


def train_bpe(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@contextlib.contextmanager
def _file_lock(path: Path):
    """One process trains a cached tokenizer; other ranks wait for it and then read the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bpe_training_sources(sources: list[SourceConfig]) -> list[SourceConfig]:
    """The sources a BPE is trained on: those trained on (weight > 0; a weight-0 source is not even
    opened), except those whose text is fetched per document (fetch: softwareheritage): fetching
    thousands of files from S3 to train a tokenizer would make it depend on the network and take
    minutes. Their share of `train_bytes` goes to the other sources; the choice is logged."""
    trained = [s for s in sources if s.weight > 0]
    fetched = [s.name for s in trained if s.fetch]
    kept = [s for s in trained if not s.fetch]
    if fetched:
        logger.info("BPE training skips %s (fetch: its text is fetched per document while training); it is trained "
                    "on %s", fetched, [s.name for s in kept])
    if not kept:
        raise DataError(
            f"no source to train the BPE tokenizer on: {fetched or [s.name for s in sources]} "
            f"{'fetch their text per document' if fetched else 'have weight 0'}. Use a pretrained tokenizer "
            f"(data.tokenizer.name_or_path=<hub id or folder>) or add a source with local text."
        )
    return kept


def _training_texts(sources: list[SourceConfig], budget: int, exclude: set) -> Iterable[str]:
    """The first `budget` bytes of the sources, split across them by weight (what the model trains on)."""
    total = sum(s.weight for s in sources)
    for source in sources:
        share = int(budget * source.weight / total)
        if share <= 0:
            continue
        stream = DocumentStream(source, endless=False, exclude=exclude)
        seen = 0
        try:
            while seen < share and (doc := stream.next_document()) is not None:
                seen += len(doc)
                yield doc
        finally:
            stream.close()


def load_or_train_bpe(cfg: TokenizerConfig, sources: list[SourceConfig], exclude: set) -> TextTokenizer:
    from tokenizers import Tokenizer

    sources = bpe_training_sources(sources)
    spec = {
        # data_dir only when set, so that tokenizers cached before the field existed are found again
        "sources": [[s.name, str(s.path), s.config, s.split, s.text_column, s.weight] + ([s.data_dir] if s.data_dir else [])
                    for s in sources],
        "vocab_size": cfg.vocab_size,
        "train_bytes": cfg.train_bytes,
        "heldout": len(exclude),
        "version": 1,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(cfg.cache_dir or default_cache_dir()) / "tokenizers" / f"bpe-{cfg.vocab_size}-{key}"
    path = directory / "tokenizer.json"
    with _file_lock(directory.parent / f"{directory.name}.lock"):
        backend = None
        if path.is_file():
            try:
                backend = Tokenizer.from_file(str(path))
            except Exception as exc:  # a corrupt cache entry is retrained, not trusted
                logger.warning("cached tokenizer %s is unreadable (%s); training it again", path, exc)
        if backend is None:
            logger.info("training a byte-level BPE (vocab %d) on %d bytes of the corpus", cfg.vocab_size, cfg.train_bytes)
            backend = train_bpe(_training_texts(sources, cfg.train_bytes, exclude), cfg.vocab_size)
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".tokenizer.json.tmp-{os.getpid()}"
            backend.save(str(tmp))
            os.replace(tmp, path)
            (directory / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    eos = backend.token_to_id(EOS_TOKEN)
    return TextTokenizer(backend, eos, f"bpe:{directory}", fingerprint=_fingerprint(backend))


def build_tokenizer(cfg: TokenizerConfig, sources: list[SourceConfig], exclude: set = frozenset()) -> TextTokenizer:
    if cfg.name_or_path == "bpe":
        return load_or_train_bpe(cfg, sources, exclude)
    return load_pretrained(cfg.name_or_path)


def check_vocab(tokenizer: TextTokenizer, model_vocab_size: int) -> None:
    """The model must have an embedding row for every token id the tokenizer can produce."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.name} produces {tokenizer.vocab_size} token ids but the model's vocab_size is "
            f"{model_vocab_size}: set model.vocab_size={tokenizer.vocab_size} (or larger), or use a smaller tokenizer"
        )
