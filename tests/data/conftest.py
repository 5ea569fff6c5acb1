"""A small local replica of HuggingFaceTB/smollm-corpus in the hub's layout: a README whose YAML
header lists the three configs and their data_files, and parquet shards with the real column names
(python-edu with blob ids only, no text). The real loader streams it through `datasets`."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

WORDS = ("the model data token learn small large train loss step rate batch shard corpus text code "
         "python function return value class object list tensor gradient layer attention expert").split()
SHARDS = {"cosmopedia-v2": 3, "fineweb-edu-dedup": 4, "python-edu": 2}
DOCS_PER_SHARD = 40


def _text(rng: random.Random, tag: str) -> str:
    n = rng.choice([3, 10, 40, 120, 400])
    return tag + " " + " ".join(rng.choice(WORDS) for _ in range(n))


def build_replica(root, with_python_text: bool = False, readme: bool = True) -> None:
    rng = random.Random(0)
    configs = dict(SHARDS)
    for config, shards in configs.items():
        (root / config).mkdir(parents=True)
        for i in range(shards):
            tags = [f"[{config} {i}:{j}]" for j in range(DOCS_PER_SHARD)]
            texts = [_text(rng, t) for t in tags]
            if config == "fineweb-edu-dedup" and i == 1:
                texts[3], texts[7] = "", "   \n\t "  # bad input the loader must skip and count
            n = len(texts)
            if config == "cosmopedia-v2":
                table = {"prompt": ["write"] * n, "text": texts, "token_length": [len(t) // 4 for t in texts],
                         "audience": ["students"] * n, "format": ["textbook"] * n, "seed_data": ["web"] * n}
            elif config == "fineweb-edu-dedup":
                meta = [{"dump": "CC", "url": f"https://x/{j}", "date": "2024", "file_path": "f", "language": "en",
                         "language_score": 0.9, "token_count": 10, "score": 3.0, "int_score": 3} for j in range(n)]
                table = {"text": texts, "id": [f"{i}-{j}" for j in range(n)], "metadata": meta}
            else:
                table = {"blob_id": [f"{i:02d}{j:038d}" for j in range(n)], "repo_name": ["r/r"] * n,
                         "path": [f"m{j}.py" for j in range(n)], "length_bytes": [len(t) for t in texts],
                         "score": [3.5] * n, "int_score": [4] * n}
                if with_python_text:
                    table["text"] = texts
            pq.write_table(pa.table(table), root / config / f"train-{i:05d}-of-{shards:05d}.parquet")
    header = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n" for c in configs
    )
    if readme:
        (root / "README.md").write_text(f"---\nlicense: odc-by\nconfigs:\n{header}---\n# smollm-corpus (test replica)\n")


FINEMATH_DOCS = 30


def build_finemath(root) -> None:
    """HuggingFaceTB/finemath's layout for config finemath-4plus (a `text` column), without a README:
    what downloading only that folder gives."""
    rng = random.Random(1)
    (root / "finemath-4plus").mkdir(parents=True)
    texts = [_text(rng, f"[finemath {j}]") for j in range(FINEMATH_DOCS)]
    table = {"url": [f"https://m/{j}" for j in range(FINEMATH_DOCS)], "text": texts, "score": [4.0] * FINEMATH_DOCS}
    pq.write_table(pa.table(table), root / "finemath-4plus" / "train-00000-of-00001.parquet")


@pytest.fixture(scope="session")
def smollm(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm-corpus")
    build_replica(root)
    return root


@pytest.fixture(scope="session")
def smollm_with_python_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm-corpus-local-python")
    build_replica(root, with_python_text=True)
    return root


@pytest.fixture(scope="session")
def smollm_without_readme(tmp_path_factory):
    """The same files without README.md (e.g. only the parquet folders were copied)."""
    root = tmp_path_factory.mktemp("smollm-corpus-no-readme")
    build_replica(root, readme=False)
    return root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLPRETRAIN_CACHE", str(tmp_path / "cache"))


def read_all(stream) -> list:
    """Every document of a finite stream, then close it."""
    docs = []
    while (doc := stream.next_document()) is not None:
        docs.append(doc)
    stream.close()
    return docs
