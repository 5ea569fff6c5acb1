"""Local copies of hub datasets (a source's `data_dir`, with or without the hub's README.md) and
local files whose columns differ between files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataError, DocumentStream, SourceConfig
from data.sources import open_dataset

from .conftest import DOCS_PER_SHARD, FINEMATH_DOCS, SHARDS, build_finemath, read_all


@pytest.mark.parametrize("config", ["cosmopedia-v2", "fineweb-edu-dedup"])
def test_data_dir_is_read_instead_of_the_hub(smollm, smollm_without_readme, config):
    # HF_HUB_OFFLINE=1 here: opening the hub id itself fails, so every document comes from data_dir
    expected = SHARDS[config] * DOCS_PER_SHARD - (2 if config == "fineweb-edu-dedup" else 0)  # 2 empty in fineweb
    for copy in (smollm, smollm_without_readme):
        source = SourceConfig(config, "HuggingFaceTB/smollm-corpus", config=config, data_dir=str(copy))
        docs = read_all(DocumentStream(source, endless=False))
        assert len(docs) == expected and all(d.startswith(f"[{config} ") for d in docs), copy


def test_without_readme_the_same_documents_in_the_same_order(smollm, smollm_without_readme):
    with_readme = read_all(DocumentStream(SourceConfig("c", str(smollm), config="cosmopedia-v2"), endless=False))
    without = read_all(DocumentStream(SourceConfig("c", str(smollm_without_readme), config="cosmopedia-v2"), endless=False))
    assert without == with_readme


@pytest.mark.parametrize("cut", [5, 47, 130])
def test_without_readme_resume_is_exact(smollm_without_readme, cut):
    source = SourceConfig("c", "HuggingFaceTB/smollm-corpus", config="cosmopedia-v2", data_dir=str(smollm_without_readme))
    reference = DocumentStream(source, 1, 2, read_batch=8)
    expected = [reference.next_document() for _ in range(150)]  # past the end of node 1's part: epoch 1
    assert reference.epoch >= 1
    first = DocumentStream(source, 1, 2, read_batch=8)
    got = [first.next_document() for _ in range(cut)]
    second = DocumentStream(source, 1, 2, read_batch=8)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [second.next_document() for _ in range(150 - cut)]
    assert got == expected


def test_a_folder_copied_alone(tmp_path):
    """Only finemath's finemath-4plus folder, no README: what `--include 'finemath-4plus/*'` gives."""
    build_finemath(tmp_path / "finemath")
    source = SourceConfig("finemath", "HuggingFaceTB/finemath", config="finemath-4plus", data_dir=str(tmp_path / "finemath"))
    docs = read_all(DocumentStream(source, endless=False))
    assert len(docs) == FINEMATH_DOCS and all(d.startswith("[finemath ") for d in docs)


def test_a_directory_of_files_with_a_readme_that_lists_no_configs(tmp_path):
    (tmp_path / "README.md").write_text("# my corpus\nNotes, not data.\n")
    for i in range(2):
        pq.write_table(pa.table({"text": [f"doc {i}-{j}" for j in range(3)]}), tmp_path / f"part-{i}.parquet")
    docs = read_all(DocumentStream(SourceConfig("mine", str(tmp_path)), endless=False))
    assert sorted(docs) == [f"doc {i}-{j}" for i in range(2) for j in range(3)]


def test_bad_local_copies_are_clear_errors(smollm_without_readme, tmp_path):
    with pytest.raises(DataError, match=r"data_dir '/does/not/exist' is not a directory; point it at a local copy of "
                                        r"'HuggingFaceTB/smollm-corpus'"):
        open_dataset(SourceConfig("c", "HuggingFaceTB/smollm-corpus", config="cosmopedia-v2", data_dir="/does/not/exist"))
    with pytest.raises(DataError, match=r"has no folder 'cosmopedia' \(its folders: \['cosmopedia-v2', "
                                        r"'fineweb-edu-dedup', 'python-edu'\]\) and no README.md listing that config"):
        open_dataset(SourceConfig("c", str(smollm_without_readme), config="cosmopedia"))
    with pytest.raises(DataError, match=r"has no files of split 'test' \(splits by file name: \['train'\]\)"):
        open_dataset(SourceConfig("c", str(smollm_without_readme), config="cosmopedia-v2", split="test"))
    # python-edu carries blob ids only: the hint holds on this route too
    with pytest.raises(DataError, match=r"column 'text' not in \[.*'blob_id'.*set fetch: softwareheritage"):
        open_dataset(SourceConfig("py", str(smollm_without_readme), config="python-edu"))


def _parquet(path, texts, **extra):
    pq.write_table(pa.table({"text": texts, **extra}), path)


def test_parquet_files_whose_other_columns_differ_are_read(tmp_path):
    n = 5
    _parquet(tmp_path / "a.parquet", [f"a{i} text" for i in range(n)], id=list(range(n)))
    _parquet(tmp_path / "b.parquet", [f"b{i} text" for i in range(n)], url=["u"] * n, score=[1.5] * n)
    _parquet(tmp_path / "c.parquet", [f"c{i} text" for i in range(n)])
    source = SourceConfig("files", str(tmp_path / "*.parquet"))
    assert open_dataset(source).column_names == ["text"]  # only the text column is read
    docs = read_all(DocumentStream(source, endless=False))
    assert sorted(docs) == sorted(f"{p}{i} text" for p in "abc" for i in range(n))


def test_parquet_files_without_the_text_column_are_named(tmp_path):
    _parquet(tmp_path / "a.parquet", ["x"] * 3, id=[1, 2, 3])
    pq.write_table(pa.table({"content": ["y"] * 3, "id": [1, 2, 3]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"body": ["z"] * 3}), tmp_path / "c.parquet")
    with pytest.raises(DataError) as error:
        DocumentStream(SourceConfig("files", str(tmp_path / "*.parquet")))
    message = str(error.value)
    assert "the files have different columns: 2 of 3 lack column 'text'" in message
    assert f"{tmp_path / 'b.parquet'}, {tmp_path / 'c.parquet'}: columns ['content', 'id']" in message
    assert f"e.g. {tmp_path / 'a.parquet'}: columns ['text', 'id']" in message
    assert "Give one source per kind of file (data.sources.N.path for each" in message
    assert "set text_column to a column every file has (there is none)" in message


def test_json_files_whose_columns_differ_are_a_clear_error(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"a{i}", "id": i}) for i in range(3)) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"b{i}", "url": "u"}) for i in range(3)) + "\n")
    stream = DocumentStream(SourceConfig("j", str(tmp_path / "*.jsonl")), endless=False)
    with pytest.raises(DataError, match=r"source 'j': its files do not all have the same columns .*Give one source per "
                                        r"kind of file"):
        read_all(stream)
