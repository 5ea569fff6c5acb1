"""The data side of `python -m train`, used as a user would: loader workers whatever
TOKENIZERS_PARALLELISM says, the smollm preset on local copies, weight-0 sources that are never
opened, `data=files` defaults and files with different columns; and, on in-process ranks, exact
per-source token counts after a change of world size."""

from __future__ import annotations

import json
import re
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data.conftest import build_finemath, build_replica

from .conftest import FAST, losses, metrics, run_train


def _tokens_per_source(stderr: str) -> dict:
    """The end-of-run log line: `tokens trained per source: {...}` (summed over ranks)."""
    found = re.findall(r"tokens trained per source: (\{.*\})", stderr)
    assert found, stderr[-3000:]
    return eval(found[-1])  # a dict literal of str -> int written by the trainer


def test_loader_workers_train_with_tokenizers_parallelism_on(tmp_path, env):
    """The parent uses the tokenizers thread pool (held-out encoding, BPE training) before forking
    the loader workers; with TOKENIZERS_PARALLELISM=true the workers used to wait on it forever."""
    out = tmp_path / "run"
    try:
        run_train([f"trainer.output_dir={out}", *FAST, "data.num_workers=2", "trainer.max_steps=3",
                   "trainer.eval_every=3"], {**env, "TOKENIZERS_PARALLELISM": "true"}, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("python -m train data.num_workers=2 with TOKENIZERS_PARALLELISM=true hung")
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """smollm-corpus with the hub's README.md, the same without it, and finemath's folder alone."""
    root = tmp_path_factory.mktemp("hub-copies")
    build_replica(root / "smollm-corpus")
    build_replica(root / "smollm-corpus-no-readme", readme=False)
    build_finemath(root / "finemath")
    return root


SMALL_TOKENIZER = ["data.tokenizer.name_or_path=bpe", "data.tokenizer.vocab_size=2048"]  # Doge's is on the hub


def test_smollm_preset_on_a_local_copy_without_its_weight_zero_sources(tmp_path, env, replicas):
    """Offline (HF_HUB_OFFLINE=1): fineweb-edu and cosmopedia-v2 from a local copy; python-edu at weight
    0 with a data_dir that does not exist, finemath at weight 0 on the hub: neither may be opened."""
    copy = replicas / "smollm-corpus"
    out = tmp_path / "run"
    proc = run_train([f"trainer.output_dir={out}", "data=smollm", *FAST, *SMALL_TOKENIZER, "trainer.max_steps=2",
                      f"data.sources.0.data_dir={copy}", f"data.sources.1.data_dir={copy}",
                      "data.sources.2.weight=0", "data.sources.2.data_dir=/does/not/exist",
                      "data.sources.3.weight=0"], env)
    assert "sources with weight 0 are left out: ['python-edu', 'finemath']" in proc.stderr
    tokens = _tokens_per_source(proc.stderr)
    assert set(tokens) == {"fineweb-edu", "cosmopedia-v2"} and sum(tokens.values()) == 2 * 8 * 64


def test_smollm_preset_from_one_key_per_local_copy_says_each_fact_once(tmp_path, env, replicas):
    """One key per dataset copy, copies without the hub's README.md. The log says each fact once: the
    mixture once per run (not per loader worker, held-out pass and tokenizer), and which sources repeated
    in the run's last lines (not a line per loader node and pass: finemath, 30 documents, repeats often
    in 10 steps)."""
    out = tmp_path / "run"
    proc = run_train([f"trainer.output_dir={out}", "data=smollm", *FAST, *SMALL_TOKENIZER, "trainer.max_steps=10",
                      f"data.smollm_corpus_dir={replicas / 'smollm-corpus-no-readme'}",
                      f"data.finemath_dir={replicas / 'finemath'}", "data.sources.2.weight=0"], env)
    tokens = _tokens_per_source(proc.stderr)
    assert set(tokens) == {"fineweb-edu", "cosmopedia-v2", "finemath"} and all(tokens.values())
    assert proc.stderr.count("sources with weight 0 are left out: ['python-edu']") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("mixture weights normalised to ") == 1, proc.stderr[-3000:]
    assert not re.search(r"epoch \d+ begins", proc.stderr), proc.stderr[-3000:]
    found = re.findall(r"sources read to the end and begun again \(times, on the loader node that read most\): "
                       r"(\{.*\})", proc.stderr)
    assert len(found) == 1, proc.stderr[-3000:]
    repeated = eval(found[0])  # a dict literal of str -> int written by the trainer
    last = metrics(out)[-1]
    assert repeated == {name: last[f"data/{name}/epoch"] for name in tokens if last[f"data/{name}/epoch"]}
    assert repeated["finemath"] >= 1


def _offline_command_of_the_docs() -> tuple[list[str], dict, list[str]]:
    """The documented offline smollm example (docs/data.md, "A local copy of smollm-corpus"), as written:
    its `hf download` lines as (repo id, local dir) and its `python -m train` line as (environment,
    arguments)."""
    import shlex

    from .conftest import REPO

    page = (REPO / "docs" / "data.md").read_text()
    bullet = page[page.index("* **A local copy of smollm-corpus**"):]
    block = bullet[bullet.index("```bash") + len("```bash"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    downloads, command = [], None
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["hf", "download"]:
            downloads.append((words[2], words[words.index("--local-dir") + 1]))
        elif "python" in words and command is None:
            start = words.index("python")
            assert words[start + 1:start + 3] == ["-m", "train"], line
            command = (dict(w.split("=", 1) for w in words[:start]), words[start + 3:])
    assert command is not None, block
    return downloads, *command


def test_the_offline_smollm_command_of_the_docs_runs_offline_as_written(tmp_path, env, replicas):
    """The command of docs/data.md, word for word, with each `hf download` target replaced by a local copy
    of the same layout (the corpus replicas here; for the tokenizer, a folder of tokenizer files) and the run
    made small (steps, batch, sequence length, fp32 on a CPU). Offline: the hub is out of reach, boto3 not
    installed; a path the command reads but no `hf download` line provides stays as written and fails."""
    from data import SourceConfig, TokenizerConfig, build_tokenizer

    tokenizer_dir = tmp_path / "tokenizer"
    build_tokenizer(TokenizerConfig(vocab_size=512, train_bytes=200_000, cache_dir=str(tmp_path / "bpe")),
                    [SourceConfig("python-stdlib", "builtin:python-stdlib")]).save(tokenizer_dir)
    copies = {"HuggingFaceTB/smollm-corpus": replicas / "smollm-corpus", "HuggingFaceTB/finemath": replicas / "finemath",
              "SmallDoge/Doge-tokenizer": tokenizer_dir}
    downloads, command_env, args = _offline_command_of_the_docs()
    for repo, local_dir in downloads:
        args = [a.replace(local_dir, str(copies[repo])) for a in args]
    out = tmp_path / "run"
    small = [*FAST, "trainer.max_steps=2", "trainer.precision=fp32", f"trainer.output_dir={out}"]
    proc = run_train([*args, *small], {**env, **command_env, "HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(out)) == [1, 2]
    assert set(_tokens_per_source(proc.stderr)) == {"fineweb-edu", "cosmopedia-v2", "finemath"}


def test_python_edu_is_fetched_for_training_and_skipped_by_bpe_training(tmp_path, env, replicas):
    """python-edu rows carry Software Heritage blob ids, no text. BPE training skips the source (and says
    so) rather than reading it row by row for nothing; training fetches each document, here from the
    fetcher's cache on disk, as an earlier run leaves it (S3 is out of reach and boto3 not installed)."""
    import gzip

    copy = replicas / "smollm-corpus"
    cache = tmp_path / "cache"  # this run's own: its BPE and the blob cache
    blobs = {}
    for shard in sorted((copy / "python-edu").glob("*.parquet")):
        for blob_id in pq.read_table(shard, columns=["blob_id"]).column(0).to_pylist():
            blobs[blob_id] = f"def f_{blob_id[-4:]}(x):\n    return x + {len(blobs)}\n"
    for blob_id, text in blobs.items():
        path = cache / "softwareheritage" / blob_id[:2] / f"{blob_id}.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(text.encode()))
    out = tmp_path / "run"
    proc = run_train([f"trainer.output_dir={out}", "data=smollm", *FAST, *SMALL_TOKENIZER, "trainer.max_steps=2",
                      f"data.smollm_corpus_dir={copy}", "data.sources.2.weight=0.5", "data.sources.3.weight=0"],
                     {**env, "SMOLPRETRAIN_CACHE": str(cache)})
    assert ("BPE training skips ['python-edu'] (fetch: its text is fetched per document while training); it is "
            "trained on ['fineweb-edu', 'cosmopedia-v2']") in proc.stderr, proc.stderr[-3000:]
    tokens = _tokens_per_source(proc.stderr)
    assert tokens["python-edu"] > 0 and sum(tokens.values()) == 2 * 8 * 64, tokens
    record = metrics(out)[-1]
    assert record["data/python-edu/documents"] > 0 and record["data/python-edu/skipped_fetch"] == 0


def test_every_problem_of_the_data_is_named_at_once_before_any_work(tmp_path, env, replicas):
    """Offline, without boto3 and without the blobs cached: python-edu cannot be fetched, and the preset's
    tokenizer (on the hub) cannot be loaded. Independent problems, both in the one refusal."""
    out = tmp_path / "run"
    proc = run_train([f"trainer.output_dir={out}", "data=smollm", *FAST, "trainer.max_steps=2",
                      f"data.smollm_corpus_dir={replicas / 'smollm-corpus'}", "data.sources.2.weight=0.5",
                      "data.sources.3.weight=0"], {**env, "SMOLPRETRAIN_CACHE": str(tmp_path / "cache")}, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: 2 problems with the data: (1) "), proc.stderr[-3000:]
    assert "python-edu needs boto3 to fetch file contents from Software Heritage" in errors[0]
    assert "tokenizer 'SmallDoge/Doge-tokenizer': could not load it" in errors[0]
    assert "use data.tokenizer.name_or_path=bpe to train one on the corpus" in errors[0]
    assert "Traceback" not in proc.stderr and not out.exists()


def _python_files_as_parquet(directory, columns_per_file):
    """Real text (the standard library's sources, ~1 MB) in parquet files whose other columns differ."""
    from data.sources import stdlib_files

    texts = [open(f, encoding="utf-8", errors="replace").read() for f in stdlib_files()[:200]]
    directory.mkdir()
    n = len(columns_per_file)
    for i, columns in enumerate(columns_per_file):
        part = texts[i::n]
        table = {name: [f"{name}-{j}" for j in range(len(part))] for name in columns}
        pq.write_table(pa.table({**({"text": part} if "no-text" not in columns else {"body": part}), **table}),
                       directory / f"part-{i}.parquet")


def test_files_defaults_fit_the_default_model_and_other_columns_may_differ(tmp_path, env):
    _python_files_as_parquet(tmp_path / "corpus", [["id"], ["url", "dump"], []])
    out = tmp_path / "run"
    fast = [o for o in FAST if not o.startswith("data.seq_len")]  # the files group's own sequence length
    run_train([f"trainer.output_dir={out}", "data=files", f"data.sources.0.path={tmp_path / 'corpus'}/*.parquet",
               *fast, "trainer.max_steps=2"], env)
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2]


def test_files_lacking_the_text_column_are_named(tmp_path, env):
    _python_files_as_parquet(tmp_path / "corpus", [["id"], ["no-text"], []])
    proc = run_train([f"trainer.output_dir={tmp_path / 'run'}", "data=files",
                      f"data.sources.0.path={tmp_path / 'corpus'}/*.parquet", *FAST, "trainer.max_steps=2"],
                     env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]  # found before any work: refused
    assert (f"error: source 'files': the files have different columns: 1 of 3 lack column 'text' "
            f"({tmp_path / 'corpus' / 'part-1.parquet'}: columns ['body', 'no-text']") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_token_counts_stay_exact_when_the_world_grows_and_shrinks(tmp_path, cache_dir):
    """4 steps on one rank, 2 more on two ranks, then 2 more on one again, each time with a fresh data
    order: the tokens per source, summed over ranks, are those of all steps (rank 1 has no saved state
    when the world grows and must not count rank 0's; when it shrinks, rank 1's count is not lost). On
    in-process ranks (tests/ranks.py); rank 0's log holds the end-of-run line."""
    from tests.ranks import train_in_ranks

    out = tmp_path / "run"
    env = {"SMOLPRETRAIN_CACHE": str(cache_dir)}
    common = [f"trainer.output_dir={out}", *FAST, "trainer.resume=auto", "data.allow_new_order=true"]
    train_in_ranks([f"trainer.output_dir={out}", *FAST, "trainer.max_steps=4"], 1, env=env)
    tokens_per_step = 8 * 64  # global batch x seq_len
    for world, steps in ((2, 6), (1, 8)):
        log = train_in_ranks([*common, f"trainer.max_steps={steps}"], world, env=env)[0]["log"]
        assert _tokens_per_source(log) == {"python-stdlib": steps * tokens_per_step}
        assert metrics(out)[-1]["tokens"] == steps * tokens_per_step  # what metrics.jsonl says
    assert metrics(out)[-1]["data/python-stdlib/tokens"] == 8 * tokens_per_step


def test_a_source_without_a_usable_document_names_the_cause(tmp_path, env):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(6)))
    proc = run_train([f"trainer.output_dir={tmp_path / 'run'}", "data=files", f"data.sources.0.path={docs}", *FAST,
                      "trainer.max_steps=2", "data.eval.holdout_documents=100"], env, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: source 'files': the source got no usable document in a whole pass: all 6 documents it read were "
        "held out for evaluation (data.eval.holdout_documents=100: the first documents of each source); lower "
        "data.eval.holdout_documents, or give separate data.eval.sources")
    assert "Traceback" not in proc.stderr
