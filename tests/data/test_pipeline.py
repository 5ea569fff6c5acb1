"""The token pipeline: exact resume (in-process, with DataLoader workers, on simulated ranks, after a
second resume, across epochs), rank/worker partitioning, mixture proportions, packing, document
masking, the held-out stream, and bad configurations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from data import (
    DataConfig, DataError, EvalConfig, HeldOut, PackedRows, SourceConfig, TokenizerConfig, TokenLoader,
    build_tokenizer, eval_batches, mixture_weights,
)


def replica_config(root, **overrides) -> DataConfig:
    values = dict(
        sources=[SourceConfig("fineweb-edu", str(root), config="fineweb-edu-dedup", weight=0.7),
                 SourceConfig("cosmopedia", str(root), config="cosmopedia-v2", weight=0.3)],
        tokenizer=TokenizerConfig("bpe", vocab_size=400, train_bytes=100_000),
        seq_len=32, batch_size=4, shuffle_buffer=16, read_batch=8,
        eval=EvalConfig(holdout_documents=4, max_batches=2),
    )
    values.update(overrides)
    return DataConfig(**values)


def setup(cfg, rank=0, world_size=1):
    heldout = HeldOut(cfg)
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.sources, heldout.exclude)
    return TokenLoader(cfg, tokenizer, rank, world_size, heldout), tokenizer, heldout


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), as the trainer stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_an_uninterrupted_run(smollm, num_workers):
    # 120 batches of 8 x 64 tokens go past the end of every source of the replica
    cfg = replica_config(smollm, num_workers=num_workers, seq_len=64, batch_size=8)
    reference = take(setup(cfg)[0], 120)
    first, _, _ = setup(cfg)
    got = take(first, 37)
    state = roundtrip(first.state_dict())
    second, _, _ = setup(cfg)
    second.load_state_dict(state)
    got += take(second, 41)
    state = roundtrip(second.state_dict())  # and a second resume
    third, _, _ = setup(cfg)
    third.load_state_dict(state)
    got += take(third, 42)
    assert same(got, reference)
    assert third.source_stats()["fineweb-edu"]["epoch"] >= 1  # crossed an epoch boundary


def test_resume_on_two_simulated_ranks(smollm):
    cfg = replica_config(smollm)
    for rank in range(2):
        reference = take(setup(cfg, rank, 2)[0], 30)
        first = setup(cfg, rank, 2)[0]
        got = take(first, 11)
        second = setup(cfg, rank, 2)[0]
        second.load_state_dict(roundtrip(first.state_dict()))
        got += take(second, 19)
        assert same(got, reference)


def test_ranks_and_workers_partition_the_documents(smollm):
    """Over ranks x workers, one pass over a source hands out every training document exactly once."""
    cfg = replica_config(smollm, sources=[SourceConfig("fw", str(smollm), config="fineweb-edu-dedup")])
    heldout = HeldOut(cfg)
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.sources, heldout.exclude)
    whole = PackedRows(cfg, tokenizer, exclude=heldout.exclude).streams[0]
    expected = []
    whole.endless = False
    while (d := whole.next_document()) is not None:
        expected.append(d)
    for world_size, workers in [(2, 1), (3, 2), (2, 3)]:
        seen = []
        for node in range(world_size * workers):
            stream = PackedRows(cfg, tokenizer, node, world_size * workers, heldout.exclude).streams[0]
            stream.endless = False
            while (d := stream.next_document()) is not None:
                seen.append(d)
        assert sorted(seen) == sorted(expected), (world_size, workers)
    assert not {d for _, d in heldout.documents} & set(expected)  # held-out documents never trained on


@pytest.mark.parametrize("mixture_by", ["tokens", "documents"])
def test_mixture_proportions(smollm, mixture_by):
    sources = [SourceConfig("fw", str(smollm), config="fineweb-edu-dedup", weight=7),
               SourceConfig("cosmo", str(smollm), config="cosmopedia-v2", weight=2),
               SourceConfig("py", str(smollm), config="python-edu", weight=1, fetch="softwareheritage")]
    sources[2] = SourceConfig("cosmo-again", str(smollm), config="cosmopedia-v2", weight=1)  # no network here
    cfg = replica_config(smollm, sources=sources, mixture_by=mixture_by, shuffle_buffer=0)
    heldout = HeldOut(cfg)
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.sources, heldout.exclude)
    rows = PackedRows(cfg, tokenizer, exclude=heldout.exclude)
    for _ in range(50):
        rows.next_rows(40)  # 2000 rows
    shares = np.array(rows.count, dtype=float) / sum(rows.count)
    assert np.allclose(shares, [0.7, 0.2, 0.1], atol=0.01), shares
    loader = setup(cfg)[0]
    take(loader, 200)
    tokens = np.array([s["tokens"] for s in loader.source_stats().values()], dtype=float)
    if mixture_by == "tokens":
        assert np.allclose(tokens / tokens.sum(), [0.7, 0.2, 0.1], atol=0.02)


def test_deterministic_for_a_seed_and_different_across_seeds(smollm):
    a, b = take(setup(replica_config(smollm))[0], 5), take(setup(replica_config(smollm))[0], 5)
    c = take(setup(replica_config(smollm, seed=1))[0], 5)
    assert same(a, b) and not same(a, c)


def test_packing_keeps_every_token_and_eos(smollm):
    cfg = replica_config(smollm, sources=[SourceConfig("c", str(smollm), config="cosmopedia-v2")], shuffle_buffer=0)
    loader, tokenizer, heldout = setup(cfg)
    batches = take(loader, 30)
    ids = torch.cat([b["input_ids"] for b in batches]).reshape(-1)
    targets = torch.cat([b["shift_labels"] for b in batches]).reshape(-1)
    assert torch.equal(ids[1:], targets[:-1])  # rows overlap by one token: nothing dropped between rows
    eos = (ids == tokenizer.eos_id).nonzero()[0].item()
    first = PackedRows(cfg, tokenizer, exclude=heldout.exclude).streams[0].next_document()
    assert tokenizer.decode(ids[:eos].tolist()) == first  # byte-level BPE round-trips the text exactly
    assert (ids == tokenizer.eos_id).sum() > 5 and (targets == tokenizer.eos_id).sum() > 5  # EOS is a target


def test_document_masking_positions_and_labels(smollm):
    cfg = replica_config(smollm, document_masking=True, shuffle_buffer=0)
    loader, tokenizer, _ = setup(cfg)
    for batch in take(loader, 10):
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["shift_labels"]
        assert torch.equal(pos[:, 0], torch.zeros(len(pos), dtype=torch.long))
        after_eos = torch.zeros_like(ids, dtype=torch.bool)
        after_eos[:, 1:] = ids[:, :-1] == tokenizer.eos_id
        assert torch.equal(pos[:, 1:][after_eos[:, 1:]], torch.zeros(int(after_eos[:, 1:].sum()), dtype=torch.long))
        continuing = ~after_eos
        continuing[:, 0] = False
        assert torch.equal(pos[:, 1:][continuing[:, 1:]], pos[:, :-1][continuing[:, 1:]] + 1)
        assert (labels[ids == tokenizer.eos_id] == -100).all()


def test_eval_batches_are_fixed_and_split_over_ranks(smollm):
    cfg = replica_config(smollm, eval=EvalConfig(holdout_documents=20, max_batches=3))
    _, tokenizer, heldout = setup(cfg)
    one = eval_batches(cfg, tokenizer, heldout)
    again = eval_batches(cfg, tokenizer, heldout)
    assert same(one, again) and 1 <= len(one) <= 3
    r0, r1 = eval_batches(cfg, tokenizer, heldout, 0, 2), eval_batches(cfg, tokenizer, heldout, 1, 2)
    assert not torch.equal(r0[0]["input_ids"], r1[0]["input_ids"])


def test_explicit_eval_source(smollm, tmp_path):
    import json

    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps({"text": f"validation text {i} " * 20}) for i in range(30)))
    cfg = replica_config(smollm, eval=EvalConfig(sources=[SourceConfig("val", str(tmp_path / "val.jsonl"))], holdout_documents=30))
    _, tokenizer, heldout = setup(cfg)
    assert heldout.exclude == set() and len(heldout.documents) == 30
    assert eval_batches(cfg, tokenizer, heldout)


def test_resume_with_another_world_size_is_refused_unless_asked(smollm):
    cfg = replica_config(smollm)
    loader = setup(cfg, 0, 2)[0]
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(DataError, match=r"saved with 2 data-parallel rank\(s\), data.num_workers=0 or 1.*now 1 "
                                        r"data-parallel rank\(s\), data.num_workers=0.*data.allow_new_order=true"):
        setup(cfg, 0, 1)[0].load_state_dict(state)
    fresh = setup(replica_config(smollm, allow_new_order=True), 0, 1)[0]
    fresh.load_state_dict(state)
    assert len(take(fresh, 2)) == 2


def test_changed_data_config_is_refused_on_resume(smollm):
    loader = setup(replica_config(smollm))[0]
    take(loader, 2)
    with pytest.raises(DataError, match="fingerprint"):
        setup(replica_config(smollm, seq_len=64))[0].load_state_dict(loader.state_dict())


def test_weights(smollm):
    a, b = SourceConfig("a", "x", weight=3), SourceConfig("b", "y", weight=1)
    kept, weights = mixture_weights([a, b, SourceConfig("c", "z", weight=0)])
    assert [s.name for s in kept] == ["a", "b"] and weights == [0.75, 0.25]
    with pytest.raises(DataError, match="weight -1 is negative"):
        mixture_weights([a, SourceConfig("n", "z", weight=-1)])
    with pytest.raises(DataError, match="every source has weight 0"):
        mixture_weights([SourceConfig("n", "z", weight=0)])


def test_pretokenized_shards_give_the_same_batches(smollm, tmp_path):
    from data import pretokenize

    cfg = replica_config(smollm, sources=[SourceConfig("c", str(smollm), config="cosmopedia-v2")])
    _, tokenizer, _ = setup(cfg)
    index = pretokenize.write(cfg.sources[0], tokenizer, tmp_path / "tok", shard_tokens=5000)
    assert len(index["shards"]) > 1 and index["dtype"] == "uint16"
    pre = replica_config(smollm, sources=[SourceConfig("c", str(tmp_path / "tok"))], tokenizer=cfg.tokenizer)
    heldout = HeldOut(pre)
    loader = TokenLoader(pre, tokenizer, heldout=heldout)
    text_loader = setup(cfg)[0]
    assert same(take(loader, 25), take(text_loader, 25))
    # resume works the same way on the fast path
    first = TokenLoader(pre, tokenizer, heldout=heldout)
    got = take(first, 10)
    second = TokenLoader(pre, tokenizer, heldout=heldout)
    second.load_state_dict(roundtrip(first.state_dict()))
    assert same(got + take(second, 15), take(TokenLoader(pre, tokenizer, heldout=heldout), 25))
    # a different tokenizer is refused
    other = build_tokenizer(TokenizerConfig("bpe", vocab_size=300, train_bytes=50_000), cfg.sources)
    with pytest.raises(DataError, match="was tokenized with"):
        take(TokenLoader(pre, other), 1)


def test_weight_zero_source_is_never_opened(smollm):
    """Its path does not exist: opening it anywhere (held-out set, tokenizer, loader) would fail."""
    gone = SourceConfig("gone", "/does/not/exist/*.parquet", weight=0)
    cfg = replica_config(smollm)
    with_gone = replica_config(smollm, sources=[*cfg.sources, gone])
    loader, _, heldout = setup(with_gone)
    assert same(take(loader, 5), take(setup(cfg)[0], 5))
    assert loader.state_dict()["fingerprint"] == setup(cfg)[0].state_dict()["fingerprint"]
    assert set(loader.counters()) == {"fineweb-edu", "cosmopedia"}


def test_source_names_must_differ(smollm):
    twice = [SourceConfig("a", str(smollm), config="cosmopedia-v2"), SourceConfig("a", str(smollm), config="fineweb-edu-dedup")]
    with pytest.raises(DataError, match=r"data.sources: the names \['a'\] are used twice; give every source its own name"):
        replica_config(smollm, sources=twice)
