"""Text -> token rows: streaming corpora, tokenizers, mixtures, packing, sharding and exact resume.
Knows nothing of models or training.

    heldout = HeldOut(cfg)                              # evaluation documents (never trained on)
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.sources, heldout.exclude)
    loader = TokenLoader(cfg, tokenizer, rank, world_size, heldout)
    for batch in loader: ...                            # {input_ids, shift_labels[, position_ids]}
    loader.counters()                                   # per source: tokens, documents, skips, epoch
    loader.state_dict() / loader.load_state_dict(state) # exact resume
"""

from .heldout import HeldOut, eval_batches
from .pipeline import (COUNTER_FIELDS, DataConfig, EvalConfig, PackedRows, TokenLoader, log_mixture, merge_counters,
                       mixture_weights)
from .sources import BUILTIN_PYTHON_STDLIB, DataError, DocumentStream, SourceConfig
from .tokenizer import TextTokenizer, TokenizerConfig, build_tokenizer, check_vocab

__all__ = [
    "BUILTIN_PYTHON_STDLIB", "COUNTER_FIELDS", "DataConfig", "DataError", "DocumentStream", "EvalConfig", "HeldOut",
    "PackedRows", "SourceConfig", "TextTokenizer", "TokenLoader", "TokenizerConfig", "build_tokenizer", "check_vocab",
    "eval_batches", "log_mixture", "merge_counters", "mixture_weights",
]
