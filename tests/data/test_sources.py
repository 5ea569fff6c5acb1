"""Sources: the real `datasets` streaming path on a local hub-layout replica, files, the built-in
corpus, node partitioning, exact resume of a stream, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import time

import pytest

from data import BUILTIN_PYTHON_STDLIB, DataError, DocumentStream, SourceConfig
from data.swh import SoftwareHeritageFetcher

from .conftest import DOCS_PER_SHARD, SHARDS, read_all


@pytest.mark.parametrize("config", ["cosmopedia-v2", "fineweb-edu-dedup"])
def test_replica_streams_through_datasets(smollm, config):
    docs = read_all(DocumentStream(SourceConfig(config, str(smollm), config=config), endless=False))
    skipped = 2 if config == "fineweb-edu-dedup" else 0  # the empty and the whitespace-only document
    assert len(docs) == SHARDS[config] * DOCS_PER_SHARD - skipped
    assert all(d.startswith(f"[{config} ") for d in docs)


def test_empty_and_whitespace_documents_are_skipped_and_counted(smollm):
    stream = DocumentStream(SourceConfig("fw", str(smollm), config="fineweb-edu-dedup"), endless=False)
    read_all(stream)
    assert stream.stats.skipped_empty == 2


def test_missing_text_column_is_a_clear_error(smollm):
    with pytest.raises(DataError, match=r"column 'text' not in \[.*blob_id.*set fetch: softwareheritage"):
        DocumentStream(SourceConfig("py", str(smollm), config="python-edu"))
    with pytest.raises(DataError, match=r"column 'body' not in"):
        DocumentStream(SourceConfig("fw", str(smollm), config="fineweb-edu-dedup", text_column="body"))


def test_local_python_edu_copy_with_text(smollm_with_python_text):
    docs = read_all(DocumentStream(SourceConfig("py", str(smollm_with_python_text), config="python-edu"), endless=False))
    assert len(docs) == SHARDS["python-edu"] * DOCS_PER_SHARD


class _FakeS3:
    """Stands in for the Software Heritage bucket: gzip bodies for known blobs, errors for others."""

    def __init__(self, known: dict):
        self.known, self.calls = known, 0

    def get_object(self, Bucket, Key):
        self.calls += 1
        assert Bucket == "softwareheritage" and Key.startswith("content/")
        blob = Key.removeprefix("content/")
        if blob not in self.known:
            raise ConnectionError("no such blob")
        import io

        return {"Body": io.BytesIO(gzip.compress(self.known[blob].encode()))}


def test_python_edu_fetches_caches_and_counts_failures(smollm, tmp_path):
    blobs = [f"00{j:038d}" for j in range(DOCS_PER_SHARD)] + [f"01{j:038d}" for j in range(DOCS_PER_SHARD)]
    known = {b: f"def f{i}():\n    return {i}\n" for i, b in enumerate(blobs) if i % 10 != 3}  # some missing
    s3 = _FakeS3(known)
    source = SourceConfig("py", str(smollm), config="python-edu", fetch="softwareheritage")
    fetcher = SoftwareHeritageFetcher(tmp_path / "swh", client=s3)
    stream = DocumentStream(source, endless=False, fetcher=fetcher)
    docs = read_all(stream)
    assert len(docs) == len(known) and stream.stats.skipped_fetch == len(blobs) - len(known)
    assert all(d.startswith("def f") for d in docs)
    calls = s3.calls
    again = read_all(DocumentStream(source, endless=False, fetcher=SoftwareHeritageFetcher(tmp_path / "swh", client=s3)))
    assert again == docs
    assert s3.calls - calls == len(blobs) - len(known)  # the fetched ones came from the disk cache


def test_python_edu_unreachable_stops_with_a_message(smollm, tmp_path):
    source = SourceConfig("py", str(smollm), config="python-edu", fetch="softwareheritage")
    stream = DocumentStream(source, fetcher=SoftwareHeritageFetcher(tmp_path / "swh", client=_FakeS3({})))
    with pytest.raises(DataError, match="none of .* Software Heritage blobs could be fetched"):
        stream.next_document()


def test_hub_id_offline_fails_fast_with_what_was_tried():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    start = time.monotonic()
    with pytest.raises(DataError, match=r"HuggingFaceTB/smollm-corpus.*cosmopedia-v2.*Offline\? .*set this source's "
                                        r"data_dir=DIR \(data=smollm: data.smollm_corpus_dir=DIR\)"):
        DocumentStream(SourceConfig("c", "HuggingFaceTB/smollm-corpus", config="cosmopedia-v2"))
    assert time.monotonic() - start < 10


def test_hub_unreachable_without_offline_mode_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    import huggingface_hub

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"cannot reach it on the Hugging Face hub"):
        DocumentStream(SourceConfig("c", "HuggingFaceTB/smollm-corpus", config="cosmopedia-v2"))
    assert time.monotonic() - start < 15
    del huggingface_hub


def test_local_files_jsonl_txt_and_globs(tmp_path):
    lines = [json.dumps({"text": f"json doc {i}"}).encode() for i in range(5)]
    lines.append(b'{"text": "bad bytes \xff\xfe here"}')
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "t").mkdir()
    for i in range(3):
        (tmp_path / "t" / f"{i}.txt").write_bytes(f"text file {i}\nsecond line\n".encode() + b"\xff\xfe latin-1 \xe9")
    jsonl = read_all(DocumentStream(SourceConfig("j", str(tmp_path / "a.jsonl")), endless=False))
    assert jsonl[:5] == [f"json doc {i}" for i in range(5)]
    assert jsonl[5].startswith("bad bytes") and "\ufffd" in jsonl[5]
    txt = read_all(DocumentStream(SourceConfig("t", str(tmp_path / "t" / "*.txt")), endless=False))
    assert len(txt) == 3 and all("second line" in d for d in txt)  # one document per file
    with pytest.raises(DataError, match=r"source 'x': no files match '.*nothing-\*.parquet'; set its path "
                                        r"\(data.sources.N.path=...\)"):
        DocumentStream(SourceConfig("x", str(tmp_path / "nothing-*.parquet")))


def test_builtin_corpus_needs_no_download_and_survives_non_utf8():
    stream = DocumentStream(SourceConfig("stdlib", BUILTIN_PYTHON_STDLIB), endless=False, read_batch=16)
    docs = [stream.next_document() for _ in range(40)]
    stream.close()
    assert all(isinstance(d, str) and d.strip() for d in docs)


@pytest.mark.parametrize("num_nodes", [1, 2, 3, 4, 5, 6, 8])
def test_nodes_partition_the_stream(smollm, num_nodes):
    """Ranks x workers: every document exactly once over all nodes, shards dividing or not."""
    source = SourceConfig("fw", str(smollm), config="fineweb-edu-dedup")
    everything = read_all(DocumentStream(source, endless=False))
    parts = [read_all(DocumentStream(source, node, num_nodes, endless=False)) for node in range(num_nodes)]
    union = [d for part in parts for d in part]
    assert sorted(union) == sorted(everything) and len(set(union)) == len(union)


@pytest.mark.parametrize("cut", [0, 1, 9, 50, 117, 118, 119, 200, 300])
@pytest.mark.parametrize("num_nodes", [1, 3])
def test_stream_resume_is_exact_across_epochs(smollm, cut, num_nodes):
    source = SourceConfig("c", str(smollm), config="cosmopedia-v2")
    reference = DocumentStream(source, 1 % num_nodes, num_nodes, read_batch=16)
    expected = [reference.next_document() for _ in range(320)]  # several epochs
    assert reference.epoch >= 2
    first = DocumentStream(source, 1 % num_nodes, num_nodes, read_batch=16)
    got = [first.next_document() for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))  # the state survives a JSON round trip too
    first.close()
    second = DocumentStream(source, 1 % num_nodes, num_nodes, read_batch=16)
    second.load_state_dict(state)
    got += [second.next_document() for _ in range(320 - cut)]
    assert got == expected


def test_a_source_with_no_usable_document_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n".join(json.dumps({"text": " "}) for _ in range(4)) + "\n")
    stream = DocumentStream(SourceConfig("e", str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataError, match="no usable document in a whole pass"):
        stream.next_document()
