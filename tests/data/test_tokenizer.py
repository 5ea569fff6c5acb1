"""Tokenizers: a byte-level BPE trained on the corpus and cached; transformers tokenizers; the
vocabulary check; files transformers can load."""

from __future__ import annotations

import pytest

import data.tokenizer as tokenizer_module
from data import DataError, SourceConfig, TokenizerConfig, build_tokenizer, check_vocab


@pytest.fixture()
def sources(smollm):
    return [SourceConfig("fw", str(smollm), config="fineweb-edu-dedup", weight=0.7),
            SourceConfig("cosmo", str(smollm), config="cosmopedia-v2", weight=0.3)]


def test_bpe_is_trained_once_then_cached(sources, monkeypatch):
    cfg = TokenizerConfig("bpe", vocab_size=400, train_bytes=100_000)
    first = build_tokenizer(cfg, sources)
    assert first.vocab_size == 400 and first.decode([first.eos_id]) == ""  # special token, skipped on decode
    ids = first.encode_batch(["the model learns tokens"])[0]
    assert first.decode(ids) == "the model learns tokens"

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    again = build_tokenizer(cfg, sources)
    assert again.fingerprint == first.fingerprint
    # other settings are another cache entry
    with pytest.raises(AssertionError, match="trained again"):
        build_tokenizer(TokenizerConfig("bpe", vocab_size=300, train_bytes=100_000), sources)


def test_corrupt_cache_entry_is_retrained(sources, tmp_path):
    cfg = TokenizerConfig("bpe", vocab_size=300, train_bytes=50_000, cache_dir=str(tmp_path / "c"))
    first = build_tokenizer(cfg, sources)
    [path] = list((tmp_path / "c").rglob("tokenizer.json"))
    path.write_text("{ not json")
    again = build_tokenizer(cfg, sources)
    assert again.fingerprint == first.fingerprint


def test_non_utf8_text_trains_and_encodes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 \xff\xfe normal text " * 50)
    tok = build_tokenizer(TokenizerConfig("bpe", vocab_size=300, train_bytes=10_000), [SourceConfig("t", str(tmp_path / "*.txt"))])
    assert tok.encode_batch(["caf\ufffd normal"])[0]


def test_saved_files_load_in_transformers(sources, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = build_tokenizer(TokenizerConfig("bpe", vocab_size=400, train_bytes=100_000), sources)
    tok.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "the attention layer returns a tensor"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode_batch([text])[0]
    assert hf.eos_token_id == tok.eos_id
    # ... and the saved tokenizer can be used as a pretrained one
    reloaded = build_tokenizer(TokenizerConfig(str(tmp_path / "tok")), sources)
    assert reloaded.encode_batch([text]) == tok.encode_batch([text]) and reloaded.eos_id == tok.eos_id


def test_unavailable_pretrained_tokenizer_fails_fast_with_advice(sources):
    with pytest.raises(DataError, match=r"SmallDoge/Doge-tokenizer.*Offline\?.*name_or_path=bpe"):
        build_tokenizer(TokenizerConfig("SmallDoge/Doge-tokenizer"), sources)


def test_model_vocab_must_cover_the_tokenizer(sources):
    tok = build_tokenizer(TokenizerConfig("bpe", vocab_size=400, train_bytes=100_000), sources)
    check_vocab(tok, 400)
    with pytest.raises(DataError, match=r"produces 400 token ids but the model's vocab_size is 256: set model.vocab_size=400"):
        check_vocab(tok, 256)


def test_weight_zero_sources_are_not_opened_for_bpe_training(sources, monkeypatch):
    opened = []
    real = tokenizer_module.DocumentStream

    def recording(source, *args, **kwargs):
        opened.append(source.name)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "DocumentStream", recording)
    cfg = TokenizerConfig("bpe", vocab_size=300, train_bytes=50_000)
    gone = SourceConfig("gone", "/does/not/exist/*.parquet", weight=0)  # opening it would fail: no files match
    with_gone = build_tokenizer(cfg, [*sources, gone])
    assert opened == ["fw", "cosmo"]
    assert with_gone.fingerprint == build_tokenizer(cfg, sources).fingerprint


def test_fetched_sources_are_skipped_by_bpe_training_and_it_says_so(sources, smollm, monkeypatch, caplog):
    opened = []
    real = tokenizer_module.DocumentStream
    monkeypatch.setattr(tokenizer_module, "DocumentStream",
                        lambda source, *a, **k: opened.append(source.name) or real(source, *a, **k))
    python_edu = SourceConfig("python-edu", str(smollm), config="python-edu", fetch="softwareheritage", weight=0.3)
    with caplog.at_level("INFO", logger="data.tokenizer"):
        build_tokenizer(TokenizerConfig("bpe", vocab_size=300, train_bytes=50_000), [*sources, python_edu])
    assert opened == ["fw", "cosmo"]
    assert "BPE training skips ['python-edu'] (fetch: its text is fetched per document while training); it is " \
           "trained on ['fw', 'cosmo']" in caplog.text
    with pytest.raises(DataError, match=r"no source to train the BPE tokenizer on: \['python-edu'\] fetch their text "
                                        r"per document. Use a pretrained tokenizer"):
        build_tokenizer(TokenizerConfig("bpe", vocab_size=300, train_bytes=50_000), [python_edu])
