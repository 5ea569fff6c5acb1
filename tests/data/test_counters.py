"""Per-source counters (`TokenLoader.counters()`) against hand counts, exact counters after a change
of world size, and the error for a node that gets no usable document, naming the cause."""

from __future__ import annotations

import json
import re

import pytest

from data import (
    COUNTER_FIELDS, DataConfig, DataError, DocumentStream, EvalConfig, HeldOut, SourceConfig, TokenizerConfig,
    TokenLoader, build_tokenizer, merge_counters,
)
from data.sources import text_hash

from .conftest import DOCS_PER_SHARD
from .test_pipeline import replica_config, roundtrip, setup, take


def _jsonl(path, texts) -> str:
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return str(path)


def _words(tag: str, n: int = 120) -> str:
    return " ".join(f"{tag}{i % 7} token" for i in range(n))


def test_counters_match_a_hand_count(tmp_path):
    # 10 rows, dealt to the 2 loader workers alternately (one file: split by document). Each worker
    # gets 1 held-out document (the first two usable ones are held out), 2 empty ones and 2 to train on,
    # the last of them usable, so reading 4 training documents is exactly two passes over its part.
    texts = [_words("alpha"), _words("beta"), "", "   ", _words("gamma"), _words("delta"), "\n", "",
             _words("epsilon"), _words("zeta")]
    source = SourceConfig("doc", _jsonl(tmp_path / "d.jsonl", texts))
    cfg = DataConfig(sources=[source], tokenizer=TokenizerConfig("bpe", vocab_size=300, train_bytes=50_000),
                     seq_len=16, batch_size=2, shuffle_buffer=0, read_batch=4, num_workers=2,
                     eval=EvalConfig(holdout_documents=2))
    loader, _, heldout = setup(cfg)
    assert len(heldout.documents) == 2
    assert loader.counters() == {"doc": dict.fromkeys(COUNTER_FIELDS, 0)}  # every field, before anything is read
    take(loader, 2)  # one chunk of each worker, made from its first read of 4 documents
    assert loader.counters() == {"doc": {"tokens": 2 * 2 * 16, "documents": 2 * 4, "skipped_empty": 2 * 4,
                                         "skipped_heldout": 2 * 2, "skipped_fetch": 0, "epoch": 1}}


def test_merge_counters_sums_and_takes_the_largest_epoch():
    a = {"x": {"tokens": 10, "documents": 2, "skipped_empty": 1, "skipped_heldout": 0, "skipped_fetch": 3, "epoch": 2}}
    b = {"x": {"tokens": 5, "documents": 1, "skipped_empty": 0, "skipped_heldout": 4, "skipped_fetch": 0, "epoch": 1}}
    assert merge_counters([a, b]) == {"x": {"tokens": 15, "documents": 3, "skipped_empty": 1, "skipped_heldout": 4,
                                            "skipped_fetch": 3, "epoch": 2}}


def _two_rank_states(smollm, batches: int):
    cfg = replica_config(smollm)
    states, counters = [], []
    for rank in range(2):
        loader = setup(cfg, rank, 2)[0]
        take(loader, batches)
        states.append(roundtrip(loader.state_dict()))
        counters.append(loader.counters())
    return states, merge_counters(counters)


@pytest.mark.parametrize("new_world", [1, 3])
def test_new_world_size_keeps_the_counters_exact(smollm, new_world):
    states, saved = _two_rank_states(smollm, batches=5)
    cfg = replica_config(smollm, allow_new_order=True)
    tokens_per_batch = cfg.batch_size * cfg.seq_len
    assert sum(c["tokens"] for c in saved.values()) == 2 * 5 * tokens_per_batch  # hand count
    loaders = []
    for rank in range(new_world):
        loader = setup(cfg, rank, new_world)[0]
        # only the saved states this rank takes over need to be loaded
        taken = [state if old % new_world == rank else None for old, state in enumerate(states)]
        loader.load_state_dict(states[rank] if rank < 2 else states[0], all_ranks=taken)
        loaders.append(loader)
    restored = merge_counters([loader.counters() for loader in loaders])
    for name in saved:
        for key in ("tokens", "documents", "skipped_empty", "skipped_heldout", "skipped_fetch"):
            assert restored[name][key] == saved[name][key], (name, key)
    assert sum(loader.batches for loader in loaders) == 2 * 5
    with pytest.raises(DataError, match=r"rank 0 carries the data counters of saved ranks \[0, 1\]: load their states"):
        setup(cfg, 0, 1)[0].load_state_dict(states[0], all_ranks=[states[0], None])
    # ... and training on counts on top: 3 more batches per rank
    for loader in loaders:
        take(loader, 3)
    total = sum(c["tokens"] for c in merge_counters([loader.counters() for loader in loaders]).values())
    assert total == (2 * 5 + new_world * 3) * tokens_per_batch
    # the carried counts survive the next (same layout) resume
    again = setup(cfg, 0, new_world)[0]
    again.load_state_dict(roundtrip(loaders[0].state_dict()))
    assert again.counters() == loaders[0].counters()


def test_more_ranks_without_every_saved_state_still_count_once(smollm):
    """What the trainer's checkpoint loading does today: a rank with no saved state of its own is
    handed rank 0's. That state must not be counted twice."""
    states, saved = _two_rank_states(smollm, batches=4)
    cfg = replica_config(smollm, allow_new_order=True)
    loaders = []
    for rank in range(4):
        loader = setup(cfg, rank, 4)[0]
        loader.load_state_dict(states[rank] if rank < 2 else states[0])
        loaders.append(loader)
    restored = merge_counters([loader.counters() for loader in loaders])
    assert {n: c["tokens"] for n, c in restored.items()} == {n: c["tokens"] for n, c in saved.items()}
    assert sum(c["tokens"] for c in restored.values()) == 2 * 4 * cfg.batch_size * cfg.seq_len


def test_same_layout_resume_keeps_the_counters(smollm):
    cfg = replica_config(smollm, num_workers=2)
    first = setup(cfg)[0]
    take(first, 6)
    before = first.counters()
    second = setup(cfg)[0]
    second.load_state_dict(roundtrip(first.state_dict()))
    assert second.counters() == before


# ---------------------------------------------------------------------------------------------------
# A node with no usable document: the cause, with the counts


def test_all_documents_held_out(tmp_path):
    source = SourceConfig("tiny", _jsonl(tmp_path / "t.jsonl", [_words(t) for t in ("a", "b", "c")]))
    cfg = DataConfig(sources=[source], tokenizer=TokenizerConfig("bpe", vocab_size=300, train_bytes=50_000),
                     seq_len=16, batch_size=2, num_workers=2, eval=EvalConfig(holdout_documents=64))
    loader = setup(cfg)[0]
    with pytest.raises(DataError) as error:  # raised in a loader worker, handed over as it is
        take(loader, 1)
    # one file, 3 documents, 2 nodes: node 0 reads documents 0 and 2, node 1 document 1
    assert re.fullmatch(r"source 'tiny': node ([01]) of 2 got no usable document in a whole pass: all (2 documents "
                        r"node 0|1 documents node 1) of 2 read were held out for evaluation \(data.eval.holdout_documents"
                        r"=64: the first documents of each source\); lower data.eval.holdout_documents, or give "
                        r"separate data.eval.sources", str(error.value)), str(error.value)


class _NothingFetched:
    """A fetcher whose every fetch fails without stopping the run (the Software Heritage one stops by
    itself when nothing at all was ever fetched; a whole pass can still fail later, e.g. when the
    network goes down)."""

    def fetch(self, blob_ids):
        return [None] * len(blob_ids)


def test_all_documents_failed_to_fetch(smollm):
    source = SourceConfig("py", str(smollm), config="python-edu", fetch="softwareheritage")
    stream = DocumentStream(source, fetcher=_NothingFetched())
    with pytest.raises(DataError, match=rf"^source 'py': the source got no usable document in a whole pass: all "
                                        rf"{2 * DOCS_PER_SHARD} documents it read failed to fetch \(fetch: "
                                        rf"softwareheritage\); check the network"):
        stream.next_document()


def test_all_documents_empty(tmp_path):
    stream = DocumentStream(SourceConfig("e", _jsonl(tmp_path / "e.jsonl", [" ", "", "\n\t", "  "])))
    with pytest.raises(DataError, match=r"^source 'e': the source got no usable document in a whole pass: all 4 "
                                        r"documents it read were empty or whitespace-only; check text_column \('text'\)"):
        stream.next_document()


def test_fewer_documents_than_nodes(tmp_path):
    path = _jsonl(tmp_path / "three.jsonl", [_words(t) for t in ("a", "b", "c")])
    stream = DocumentStream(SourceConfig("three", path), node=3, num_nodes=4, workers_per_rank=2)
    with pytest.raises(DataError, match=r"^source 'three': node 3 of 4 got no usable document in a whole pass: the "
                                        r"source has fewer documents \(3\) than nodes \(4 = 2 ranks x 2 loader "
                                        r"workers\), so node 3 has none; use fewer ranks or loader workers"):
        stream.next_document()


def test_fewer_documents_than_nodes_through_the_loader(tmp_path):
    source = SourceConfig("three", _jsonl(tmp_path / "three.jsonl", [_words(t) for t in ("a", "b", "c")]))
    cfg = DataConfig(sources=[source], tokenizer=TokenizerConfig("bpe", vocab_size=300, train_bytes=50_000),
                     seq_len=16, batch_size=2, num_workers=2, eval=EvalConfig(holdout_documents=0))
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.sources)
    loader = TokenLoader(cfg, tokenizer, rank=1, world_size=2, heldout=HeldOut(cfg))  # nodes 2 and 3 of 4
    with pytest.raises(DataError, match=r"node 3 of 4 got no usable document in a whole pass: the source has fewer "
                                        r"documents \(3\) than nodes \(4 = 2 ranks x 2 loader workers\)"):
        take(loader, 50)


def test_a_mixture_of_causes(tmp_path):
    texts = ["", _words("kept")]
    stream = DocumentStream(SourceConfig("m", _jsonl(tmp_path / "m.jsonl", texts)), exclude={text_hash(texts[1])},
                            holdout_documents=1)
    with pytest.raises(DataError, match=r"none of the 2 documents it read is usable: 1 empty or whitespace-only, 1 held "
                                        r"out for evaluation \(data.eval.holdout_documents=1\), 0 failed to fetch"):
        stream.next_document()


def test_pretokenized_source_all_held_out_is_an_error_not_a_hang(smollm, tmp_path):
    from data import pretokenize
    from data.pipeline import open_stream

    source = SourceConfig("c", str(smollm), config="cosmopedia-v2")
    tokenizer = build_tokenizer(TokenizerConfig("bpe", vocab_size=300, train_bytes=50_000), [source])
    pretokenize.write(source, tokenizer, tmp_path / "tok")
    whole = open_stream(SourceConfig("p", str(tmp_path / "tok")), endless=False)
    everything = set()
    while (doc := whole.next_document()) is not None:
        from data.sources import doc_hash

        everything.add(doc_hash(doc))
    stream = open_stream(SourceConfig("p", str(tmp_path / "tok")), exclude=everything, holdout_documents=500)
    with pytest.raises(DataError, match=r"all 120 documents it read were held out for evaluation "
                                        r"\(data.eval.holdout_documents=500"):
        stream.next_document()
