"""train.evaluate: lm-eval scores a checkpoint with the checkpoint's own model (the log-likelihoods
lm-eval computes are our model's, for a dense checkpoint through transformers and for a per-token
routed MoE through our model), through the CLI too, and a hub task offline fails at once, before the
model is loaded, saying how to use a local task."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings

import numpy
import pytest
import torch

import models
from data.tokenizer import EOS_TOKEN, TextTokenizer, train_bpe

from .conftest import REPO

lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is an optional extra: pip install -e ".[eval]"')

from train import evaluate  # noqa: E402  (after the skip: it is only useful with lm-eval)

DOCS = [
    {"context": "def add(a, b):\n    return a", "choices": [" + b", " - b", " * b"], "label": 0},
    {"context": "import", "choices": [" os", " sys", " re"], "label": 1},
    {"context": "for i in", "choices": [" range(10):", " None:"], "label": 0},
    {"context": "class Point:\n    def __init__(self, x, y):\n        self.x =", "choices": [" x", " y"], "label": 0},
    {"context": "if __name__ ==", "choices": [" '__main__':", " 0:"], "label": 0},
]
TASK_YAML = """\
task: tiny_py
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = TASK_YAML.replace("task: tiny_py", "task: tiny_gen").replace("output_type: multiple_choice", "output_type: generate_until") \
    .replace('doc_to_choice: "{{{{choices}}}}"\n', "").replace("doc_to_target: label", 'doc_to_target: "{{{{choices[0]}}}}"') \
    .replace("metric: acc", "metric: exact_match")
TINY = dict(model_type="doge", vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, keep_window_size=64, tie_word_embeddings=True,
            max_position_embeddings=256)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A BPE tokenizer, a dense and a per-token-routed MoE checkpoint (random init: what matters is that
    lm-eval's numbers are this model's), and a task directory with a local multiple-choice task."""
    root = tmp_path_factory.mktemp("evaluate")
    texts = [d["context"] + c for d in DOCS for c in d["choices"]] * 20 + [open(json.__file__).read()]
    backend = train_bpe(texts, 384)
    tokenizer = TextTokenizer(backend, backend.token_to_id(EOS_TOKEN), "test-bpe")
    torch.manual_seed(0)
    checkpoints = {}
    for name, extra in {"dense": {}, "moe": dict(is_moe=True, num_experts=16, num_experts_per_tok=4)}.items():
        model = models.build({**TINY, **extra})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporting a per-token MoE warns that transformers routes differently
            model.save_pretrained(root / name)
        tokenizer.save(root / name)
        checkpoints[name] = root / name
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_py.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "tiny_py.yaml").write_text(TASK_YAML.format(data=tasks / "tiny_py.jsonl"))
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(data=tasks / "tiny_py.jsonl"))
    return {"tasks": tasks, **checkpoints}


def _our_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) under our model, tokenised as lm-eval does (the whole string, split
    after the context's tokens)."""
    ctx = tokenizer.encode(context).ids
    whole = tokenizer.encode(context + continuation).ids
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)[len(ctx) - 1:]
    return float(logprobs.gather(1, torch.tensor(cont).view(-1, 1)).sum())


@pytest.mark.parametrize("kind,backend", [("dense", "transformers"), ("moe", "ours")])
def test_scores_are_the_checkpoints_own_loglikelihoods(files, kind, backend):
    from tokenizers import Tokenizer

    checkpoint = files[kind]
    rng = (torch.get_rng_state(), numpy.random.get_state()[1].copy(), random.getstate())
    result = evaluate.evaluate_checkpoint(checkpoint, "tiny_py", include_path=files["tasks"], device="cpu",
                                          batch_size=4, log_samples=True)
    assert result["backend"] == backend  # auto: transformers for dense, ours for per-token MoE routing
    # lm-eval reseeds everything; a trainer calling this between steps must not notice
    assert torch.equal(torch.get_rng_state(), rng[0]) and (numpy.random.get_state()[1] == rng[1]).all()
    assert random.getstate() == rng[2]
    model = models.from_pretrained(checkpoint).eval()
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    samples = sorted(result["samples"]["tiny_py"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    correct = []
    for sample, doc in zip(samples, DOCS):
        theirs = [resp[0][0] for resp in sample["resps"]]
        ours = [_our_loglikelihood(model, tokenizer, doc["context"], choice) for choice in doc["choices"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct.append(max(range(len(ours)), key=ours.__getitem__) == doc["label"])
    accuracy = sum(correct) / len(correct)
    assert result["results"]["tiny_py"]["acc"] == pytest.approx(accuracy)
    assert result["metrics"] == {"lm_eval/tiny_py/acc": pytest.approx(accuracy)}

    written = json.loads((checkpoint / "eval" / "tiny_py.json").read_text())
    assert result["output"] == str(checkpoint / "eval" / "tiny_py.json")
    assert written["results"] == result["results"] and written["backend"] == backend
    assert written["n_samples"]["tiny_py"]["effective"] == len(DOCS)
    assert (checkpoint / "eval" / "tiny_py.samples.jsonl").is_file()


def test_cli_writes_the_results_json(files, tmp_path, env):
    out = tmp_path / "scores.json"
    proc = subprocess.run(
        [sys.executable, "-m", "train.evaluate", str(files["dense"]), "--tasks", "tiny_py", "--include-path",
         str(files["tasks"]), "--limit", "3", "--batch-size", "2", "--device", "cpu", "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out) and lines[0].split()[0] == "tiny_py/acc"
    written = json.loads(out.read_text())
    assert written["limit"] == 3 and written["n_samples"]["tiny_py"]["effective"] == 3
    assert float(lines[0].split()[1]) == pytest.approx(written["results"]["tiny_py"]["acc"], abs=1e-4)
    correct = 3 * written["results"]["tiny_py"]["acc"]
    assert correct == pytest.approx(round(correct))  # an accuracy over exactly 3 documents


def test_offline_hub_task_fails_at_once_before_loading_the_model(files, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the task's dataset cannot be had")

    monkeypatch.setattr(evaluate, "_language_model", no_model)
    # "at once": not a single connection is attempted, so no timeout or retry can delay the refusal (a
    # wall-clock bound would fail on a busy machine and prove less)
    import socket

    attempts = []

    def no_network(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(evaluate.EvaluationError) as caught:
        evaluate.evaluate_checkpoint(files["dense"], "arc_easy", limit=2, device="cpu")
    message = str(caught.value)
    assert "'arc_easy'" in message and "'allenai/ai2_arc'" in message and "offline" in message
    assert "--include-path" in message and "dataset_path: json" in message
    assert attempts == []

    with pytest.raises(evaluate.EvaluationError, match="unknown lm-eval task 'arc_esy'; did you mean arc_easy"):
        evaluate.evaluate_checkpoint(files["dense"], "arc_esy", device="cpu")  # the index is cached: instant


def test_backend_choice_and_refusals(files, tmp_path):
    assert evaluate.choose_backend(files["dense"]) == "transformers"
    assert evaluate.choose_backend(files["moe"]) == "ours"
    config = json.loads((files["moe"] / "config.json").read_text())
    config.pop("router_layout")  # written by transformers: its own layout, which transformers computes right
    (tmp_path / "hf-moe").mkdir()
    (tmp_path / "hf-moe" / "config.json").write_text(json.dumps(config))
    assert evaluate.choose_backend(tmp_path / "hf-moe") == "transformers"
    with pytest.raises(evaluate.EvaluationError, match="generation tasks"):
        evaluate.evaluate_checkpoint(files["moe"], "tiny_gen", include_path=files["tasks"], device="cpu")
    with pytest.raises(evaluate.EvaluationError, match="no such directory"):
        evaluate.evaluate_checkpoint(tmp_path / "missing", "tiny_py")
    with pytest.raises(evaluate.EvaluationError, match="without a complete checkpoint"):
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        evaluate.evaluate_checkpoint(tmp_path / "run", "tiny_py")


def test_trainer_scores_every_saved_checkpoint(files, tmp_path, env):
    """trainer.eval_tasks through `python -m train`: each save is scored and logged to metrics.jsonl; a
    task that does not exist stops the run before it trains."""
    from .conftest import FAST, metrics, run_train

    out = tmp_path / "run"
    common = [*FAST, "trainer.max_steps=4", "trainer.save_every=2", f"trainer.output_dir={out}",
              "trainer.eval_tasks=[tiny_py]", f"trainer.eval_tasks_include_path=[{files['tasks']}]",
              "trainer.eval_tasks_limit=3"]
    run_train(common, env, timeout=400)
    scored = [r for r in metrics(out) if "lm_eval/tiny_py/acc" in r]
    assert [r["step"] for r in scored] == [2, 4]
    for record in scored:
        written = json.loads(next((out / "checkpoints" / f"step-{record['step']}" / "eval").glob("*.json")).read_text())
        assert record["lm_eval/tiny_py/acc"] == pytest.approx(written["results"]["tiny_py"]["acc"])
    # the CLI on the run directory scores its newest checkpoint: the same score the trainer logged
    cli = subprocess.run(
        [sys.executable, "-m", "train.evaluate", str(out), "--tasks", "tiny_py", "--include-path", str(files["tasks"]),
         "--limit", "3", "--device", "cpu", "--output", str(tmp_path / "cli.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert cli.returncode == 0, cli.stderr[-5000:]
    by_cli = json.loads((tmp_path / "cli.json").read_text())
    assert by_cli["step"] == 4 and by_cli["results"]["tiny_py"]["acc"] == pytest.approx(scored[-1]["lm_eval/tiny_py/acc"])
    proc = run_train([*common[:-3], f"trainer.output_dir={tmp_path / 'bad'}", "trainer.eval_tasks=[tiny_pyy]",
                      f"trainer.eval_tasks_include_path=[{files['tasks']}]"], env, check=False, timeout=400)
    assert proc.returncode == 2 and "unknown lm-eval task 'tiny_pyy'" in proc.stderr
    assert not (tmp_path / "bad").exists()
