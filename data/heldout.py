"""The held-out evaluation stream: the first `data.eval.holdout_documents` usable documents of each
training source (training skips them by content hash), or separate `data.eval.sources`, packed into
fixed batches that are the same at every evaluation.

    heldout = HeldOut(cfg)                              # before the tokenizer: BPE training skips them too
    batches = eval_batches(cfg, tokenizer, heldout, rank, world_size)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .pipeline import DataConfig, mixture_weights, open_stream, rows_to_batch
from .sources import DataError, doc_hash
from .tokenizer import TextTokenizer


class HeldOut:
    """The evaluation documents: the first `holdout_documents` usable documents of each source (or of
    the explicit eval sources). Every node computes the same set, so training can skip them by hash."""

    def __init__(self, cfg: DataConfig):
        self.explicit = cfg.eval.sources is not None
        sources = cfg.eval.sources if self.explicit else mixture_weights(cfg.sources)[0]
        self.documents: list[tuple[int, Any]] = []  # (source index, document)
        for index, source in enumerate(sources if cfg.eval.holdout_documents else []):
            stream = open_stream(source, endless=False, read_batch=cfg.read_batch)
            try:
                for _ in range(cfg.eval.holdout_documents):
                    doc = stream.next_document()
                    if doc is None:
                        break
                    self.documents.append((index, doc))
            finally:
                stream.close()
        if cfg.eval.holdout_documents and not self.documents:
            raise DataError("the evaluation stream is empty: its sources gave no usable document")
        # with separate eval sources, nothing needs to be skipped in training
        self.exclude = set() if self.explicit else {doc_hash(d) for _, d in self.documents}


def eval_batches(
    cfg: DataConfig, tokenizer: TextTokenizer, heldout: HeldOut, rank: int = 0, world_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """The held-out batches of this rank: the held-out documents packed in order, rows dealt out
    to ranks round-robin, at most `eval.max_batches` batches per rank (evenly spaced over the held-out
    documents). The same every time. Every rank gets as many rows, in batches of the same sizes (the last
    num_rows mod world_size rows are left out): layouts whose forward pass is collective (expert
    parallelism) need every rank to run the same evaluation steps."""
    width = cfg.seq_len + 1
    tokens, starts = [], []
    encoded = tokenizer.encode_batch([d for _, d in heldout.documents if isinstance(d, str)])
    it = iter(encoded)
    for _, doc in heldout.documents:
        ids = np.asarray(next(it) if isinstance(doc, str) else doc, dtype=np.int32)
        ids = np.append(ids, np.int32(tokenizer.eos_id))
        tokens.append(ids)
        flags = np.zeros(len(ids), dtype=bool)
        flags[0] = True
        starts.append(flags)
    stream, flags = np.concatenate(tokens), np.concatenate(starts)
    num_rows = (len(stream) - 1) // cfg.seq_len
    if num_rows < world_size:
        raise DataError(
            f"the evaluation stream has {num_rows} rows of {cfg.seq_len} tokens for {world_size} ranks: hold out more "
            f"documents (data.eval.holdout_documents) or evaluate on fewer ranks"
        )
    mine = np.arange(rank, num_rows - num_rows % world_size, world_size)
    limit = cfg.eval.max_batches * cfg.batch_size
    if len(mine) > limit:  # spread over all held-out documents rather than the first few
        mine = mine[np.linspace(0, len(mine) - 1, limit).round().astype(int)]
    index = mine[:, None] * cfg.seq_len + np.arange(width)[None, :]
    rows = {"tokens": stream[index], "starts": flags[index]}
    return [
        rows_to_batch({k: v[i : i + cfg.batch_size] for k, v in rows.items()}, tokenizer.eos_id, cfg.document_masking)
        for i in range(0, len(mine), cfg.batch_size)
    ]
