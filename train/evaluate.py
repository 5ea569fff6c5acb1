"""Downstream evaluation of a checkpoint with lm-evaluation-harness (`pip install -e ".[eval]"`).

    python -m train.evaluate CHECKPOINT --tasks arc_easy,hellaswag [--limit N] [--batch-size B]
        [--device cpu] [--num-fewshot K] [--include-path DIR] [--backend auto] [--output FILE]

CHECKPOINT is a Hugging Face model directory (one of our `checkpoints/step-N/`, with its tokenizer) or a
run directory (its newest checkpoint). Results go to `<checkpoint>/eval/<tasks>.json` unless `--output`
says otherwise: per task its metrics (`acc`, `acc_norm`, ... and their `_stderr`), the step and tokens
of the checkpoint, the settings, and `metrics`: the same scores flattened as `lm_eval/<task>/<metric>`,
ready for metrics.jsonl. `evaluate_checkpoint(...)` does the same from Python and returns that dict;
it leaves the process's RNG states as it found them (lm-eval reseeds python, numpy and torch).

The model goes through lm-eval's Hugging Face interface (`HFLM`). Backends:
  * `transformers`: the directory loaded with `AutoModelForCausalLM` (any HF causal LM), given to HFLM.
  * `ours`: our `models.from_pretrained` wrapped for HFLM. Needed for Doge MoE checkpoints with our
    default `router_layout: per_token`: transformers routes those with its own layout, which mixes in
    other tokens' router logits (future ones included), so it would score a different, non-causal model.
    Scores log-likelihood tasks (multiple choice, perplexity); generation tasks are refused.
  * `auto` (default): `ours` for per-token-routed Doge MoE checkpoints, `transformers` otherwise.

Tasks: any lm-eval task, group or tag name, or one defined in a directory passed with `--include-path`.
A task from local files (works offline), e.g. `DIR/my_task.yaml`:

    task: my_task
    dataset_path: json
    dataset_kwargs:
      data_files: {test: /abs/path/my_task.jsonl}   # one {"context": ..., "choices": [...], "label": i} a line
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{context}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: label
    target_delimiter: ""
    metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]

The built-in tasks download their datasets from the Hugging Face hub. Offline (HF_HUB_OFFLINE=1 /
HF_DATASETS_OFFLINE=1, or the hub unreachable) a task whose dataset is not in the local datasets cache
stops at once, before the model is loaded, with a message naming the dataset and the local-task way
out; no minutes of download retries.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "ours")
PREFIX = "lm_eval/"
# exception class names (anywhere in the chain) that mean "the hub could not be reached"
_NETWORK_ERRORS = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ConnectionError"}


class EvaluationError(RuntimeError):
    """An evaluation that cannot run; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------
# The checkpoint


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model directory as is; a run directory -> its newest complete checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    if (path / "checkpoints").is_dir():
        from .checkpoint import MANIFEST, list_checkpoints

        complete = [p for p in list_checkpoints(path) if (p / MANIFEST).is_file()]
        if complete:
            return complete[-1]
        raise EvaluationError(f"{path}: a run directory without a complete checkpoint (no checkpoints/step-N/{MANIFEST})")
    if not path.exists():
        raise EvaluationError(f"{path}: no such directory; pass a checkpoint (<run>/checkpoints/step-N) or a run directory")
    raise EvaluationError(f"{path}: not a model directory (needs config.json and *.safetensors) nor a run directory")


def choose_backend(checkpoint: Path, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise EvaluationError(f"backend={backend!r}; choose one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    config = json.loads((checkpoint / "config.json").read_text())
    # A config.json without router_layout was written by transformers (or published): its layout.
    per_token = config.get("model_type") == "doge" and config.get("is_moe") and config.get("router_layout") == "per_token"
    return "ours" if per_token else "transformers"


def _trainer_state(checkpoint: Path) -> dict:
    state = checkpoint / "trainer_state" / "state.json"
    if state.is_file():
        with contextlib.suppress(ValueError):
            values = json.loads(state.read_text())
            return {k: values.get(k) for k in ("step", "tokens")}
    match = re.fullmatch(r"step-(\d+)", checkpoint.name)
    return {"step": int(match.group(1)) if match else None, "tokens": None}


# ---------------------------------------------------------------------------------------------------
# Tasks


@functools.lru_cache(maxsize=8)
def _indexed(include_path: tuple[str, ...], include_defaults: bool):
    """A TaskManager per include path, kept for the process: indexing lm-eval's own ~15k task files takes
    ~9 s, and the trainer evaluates at every save. (Task YAMLs edited meanwhile are not seen again.)"""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def _task_list(tasks) -> list[str]:
    """A comma-separated string or a list -> task names."""
    tasks = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not tasks:
        raise EvaluationError("no tasks given (e.g. --tasks arc_easy,hellaswag)")
    return tasks


def _paths(include_path) -> list[str]:
    return [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or [])]


def _task_manager(tasks: list[str], include_path: list[str]):
    """Only the include path is indexed when it defines every task asked for."""
    for path in include_path:
        if not Path(path).is_dir():
            raise EvaluationError(f"--include-path {path}: no such directory (it should hold task YAML files)")
    include_path = tuple(str(Path(p).resolve()) for p in include_path)
    if include_path:
        local = _indexed(include_path, False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = _indexed(include_path, True)
    for task in tasks:
        if task not in manager.all_tasks and not Path(task).is_file():
            close = difflib.get_close_matches(task, manager.all_tasks, n=5)
            raise EvaluationError(
                f"unknown lm-eval task {task!r}{'; did you mean ' + ', '.join(close) + '?' if close else ''} "
                f"(`lm-eval ls tasks` lists them; a task of your own: a YAML in a directory passed with --include-path)")
    return manager


def _dataset_of(manager, task: str) -> str | None:
    entry = manager.task_index.get(task)
    cfg = getattr(entry, "cfg", None) or {}
    return cfg.get("dataset_path") if isinstance(cfg, dict) else None


def _is_network_error(exc: BaseException) -> bool:
    while exc is not None:
        if type(exc).__name__ in _NETWORK_ERRORS or "Couldn't reach" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_tasks(tasks: list[str], include_path: list[str]):
    """(task manager, lm-eval Task / Group objects), each built here (dataset included) so that a dataset
    that cannot be had stops the evaluation before the model is loaded, naming its task."""
    manager = _task_manager(tasks, include_path)
    built = []
    for task in tasks:
        try:
            loaded = manager.load([task])
        except Exception as exc:
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            if not _is_network_error(exc):
                raise EvaluationError(f"task {task!r}: could not be built ({type(exc).__name__}: {first})") from exc
            found = re.search(r"reach '([^']+)'", str(exc))
            dataset = _dataset_of(manager, task) or (found.group(1) if found else "its dataset")
            raise EvaluationError(
                f"task {task!r} needs the dataset {dataset!r} from the Hugging Face hub, which cannot be downloaded "
                f"offline and is not in the local datasets cache ({first}). Either run it once with network access "
                f"(it is cached; afterwards HF_DATASETS_OFFLINE=1 uses the cache), or evaluate a local task: a YAML "
                f"with `dataset_path: json` and `dataset_kwargs: {{data_files: {{test: FILE.jsonl}}}}` in a directory "
                f"passed with --include-path DIR (example in `python -m train.evaluate --help`)."
            ) from None
        if task in loaded["groups"]:
            built.append(loaded["groups"][task])
        elif task in loaded["tasks"]:
            built.append(loaded["tasks"][task])
        else:  # a tag: its tasks
            built.extend(loaded["tasks"].values())
    return manager, built


def check_tasks(tasks, include_path=None) -> None:
    """Raise EvaluationError unless every task exists and its dataset can be loaded now: for the trainer
    to call once at start-up (rank 0), so a bad `trainer.eval_tasks` stops the run before training."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvaluationError('lm-eval is not installed: pip install -e ".[eval]"') from None
    with _offline_when_hub_unreachable():
        load_tasks(_task_list(tasks), _paths(include_path))


def _leaf_tasks(built) -> list:
    from lm_eval.api.group import Group

    out = []
    for item in built:
        out.extend(item.get_all_tasks() if isinstance(item, Group) else [item])
    return out


@contextlib.contextmanager
def _offline_when_hub_unreachable():
    """With no network and no HF_*_OFFLINE set, datasets retries each file for ~25 s before it falls
    back to its cache. One quick probe instead; if the hub is unreachable, the evaluation runs in offline
    mode (cached datasets still load) and the flags are restored afterwards."""
    import datasets.config
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        yield
        return
    try:
        huggingface_hub.get_session().head(constants.ENDPOINT, timeout=5)
        reachable = True
    except Exception as exc:  # DNS, refused, timeout, proxy
        logger.warning("the Hugging Face hub (%s) is unreachable (%s): evaluating offline, datasets only from the "
                       "local cache", constants.ENDPOINT, type(exc).__name__)
        reachable = False
    if reachable:
        yield
        return
    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, getattr(datasets.config, "HF_DATASETS_OFFLINE", None))
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    if saved[2] is not None:
        datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[0], saved[1]
        if saved[2] is not None:
            datasets.config.HF_DATASETS_OFFLINE = saved[2]


# ---------------------------------------------------------------------------------------------------
# The model


def _wrap_ours(checkpoint: Path, device: str, dtype: str):
    import torch

    import models

    torch_dtype = torch.float32 if dtype in ("auto", None) else getattr(torch, dtype)

    class OursForHFLM(torch.nn.Module):
        """Our model dressed as the pre-initialised transformers model HFLM accepts: HFLM reads `.config`
        (model_type, max_position_embeddings), `.device`, `.dtype`, calls `.eval()`, `.tie_weights()` and
        `model(input_ids).logits`."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config
            self.name_or_path = str(checkpoint)

        @property
        def device(self):
            return next(self.inner.parameters()).device

        @property
        def dtype(self):
            return next(self.inner.parameters()).dtype

        def tie_weights(self):
            pass  # from_pretrained ties them already

        def num_parameters(self):
            return self.inner.num_parameters()

        def forward(self, input_ids, attention_mask=None, **_):
            return self.inner(input_ids, attention_mask=attention_mask)

        def generate(self, *args, **kwargs):
            raise EvaluationError("the `ours` backend scores log-likelihoods only; generation tasks need "
                                  "--backend transformers")

    inner = models.from_pretrained(checkpoint, device=torch.device(device), dtype=torch_dtype).eval()
    return OursForHFLM(inner)


def _language_model(checkpoint: Path, backend: str, device: str, dtype: str, batch_size):
    """HFLM around a model we load ourselves. Given a directory name instead, HFLM would start an
    accelerate `Accelerator`, which under torchrun (WORLD_SIZE set) takes the trainer's ranks for
    data-parallel evaluation and waits for ranks that are not evaluating; a ready model keeps it to this
    process (rank 0 of 1)."""
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    if backend == "transformers":
        torch_dtype = "auto" if dtype in ("auto", None) else getattr(torch, dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch_dtype)
        model = model.to(torch.device(device)).eval()
    else:
        model = _wrap_ours(checkpoint, device, dtype)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal",
                max_length=getattr(model.config, "max_position_embeddings", None))  # None: HFLM finds it


@contextlib.contextmanager
def _rng_kept():
    """lm-eval seeds python, numpy and torch globally; the trainer's RNG streams (saved in checkpoints
    for exact resume) must go on as if no evaluation had happened."""
    from .checkpoint import rng_state, set_rng_state

    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


# ---------------------------------------------------------------------------------------------------
# Results


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _plain(value.item())
    return value


def _clean(task_results: dict) -> dict:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, "alias": ...} -> {"acc": x, "acc_stderr": s};
    a filter other than `none` stays in the name (exact_match/strict-match)."""
    out = {}
    for key, value in task_results.items():
        if "," not in key:
            continue  # alias, name, sample_len: not scores
        metric, filt = key.split(",", 1)
        if value == "N/A":
            value = None
        out[metric if filt == "none" else f"{metric}/{filt}"] = _plain(value)
    return out


def default_output(checkpoint: Path, tasks: list[str], limit, num_fewshot) -> Path:
    name = "+".join(re.sub(r"[^\w.-]", "_", t) for t in tasks)
    if len(name) > 100:
        name = f"{name[:80]}+{len(tasks)}-tasks-{hashlib.sha1('+'.join(tasks).encode()).hexdigest()[:8]}"
    if num_fewshot is not None:
        name += f".{num_fewshot}shot"
    if limit is not None:
        name += f".limit-{limit}"  # a partial score must not overwrite the full one
    return checkpoint / "eval" / f"{name}.json"


def evaluate_checkpoint(checkpoint, tasks, *, limit: int | float | None = None, batch_size: int | str = 8,
                        device: str = "auto", num_fewshot: int | None = None, include_path=None,
                        backend: str = "auto", dtype: str = "auto", output=None, log_samples: bool = False,
                        seed: int = 1234) -> dict:
    """Score `checkpoint` on lm-eval `tasks`; write the results JSON and return it (see the module
    docstring). `result["metrics"]` is flat (`lm_eval/<task>/<metric>`: score), for metrics.jsonl.
    With log_samples, `result["samples"]` holds lm-eval's per-document requests and responses (also
    written beside the JSON as `<name>.samples.jsonl`). Raises EvaluationError (never hangs offline)."""
    started = time.perf_counter()
    tasks, include_path = _task_list(tasks), _paths(include_path)
    checkpoint = resolve_checkpoint(checkpoint)
    backend = choose_backend(checkpoint, backend)
    try:
        import lm_eval
    except ImportError:
        raise EvaluationError('lm-eval is not installed: pip install -e ".[eval]"') from None
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with _offline_when_hub_unreachable(), _rng_kept():
        manager, built = load_tasks(tasks, include_path)
        if backend == "ours":
            generative = [t.task_name for t in _leaf_tasks(built) if t.get_config("output_type") == "generate_until"]
            if generative:
                raise EvaluationError(
                    f"{checkpoint}: a per-token-routed Doge MoE is scored with our model, which has no generate(); "
                    f"{generative} are generation tasks. Evaluate log-likelihood tasks, or pass --backend transformers "
                    f"knowing that transformers routes this model differently.")
        lm = _language_model(checkpoint, backend, device, dtype, batch_size)
        raw = lm_eval.simple_evaluate(
            # our manager: without one simple_evaluate indexes all of lm-eval's tasks again (~9 s)
            model=lm, tasks=built, task_manager=manager, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    results = {task: _clean(values) for task, values in raw["results"].items()}
    groups = {group: _clean(values) for group, values in (raw.get("groups") or {}).items()}
    flat = {f"{PREFIX}{task}/{metric}": value for task, values in {**results, **groups}.items()
            for metric, value in values.items() if "_stderr" not in metric and isinstance(value, (int, float))}
    result = {
        "checkpoint": str(checkpoint.resolve()),
        **_trainer_state(checkpoint),
        "tasks": tasks,
        "backend": backend,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "device": device,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "results": results,
        "groups": groups,
        "n_samples": raw.get("n-samples", {}),
        "metrics": flat,
        "seconds": round(time.perf_counter() - started, 2),
    }
    out = Path(output) if output else default_output(checkpoint, tasks, limit, num_fewshot)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)
    result["output"] = str(out)
    if log_samples:
        result["samples"] = raw.get("samples", {})
        samples_path = out.with_suffix(".samples.jsonl")
        with open(samples_path, "w") as f:
            for task, docs in result["samples"].items():
                for doc in docs:
                    f.write(json.dumps({"task": task, **doc}, default=str) + "\n")
    logger.info("lm-eval on %s (%s backend) in %.1f s: %s -> %s", checkpoint, backend, result["seconds"],
                ", ".join(f"{k[len(PREFIX):]}={v:.4f}" for k, v in flat.items()), out)
    return result


# ---------------------------------------------------------------------------------------------------
# CLI


def _batch_size(text: str):
    return text if text.startswith("auto") else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a model directory (<run>/checkpoints/step-N) or a run directory")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, groups or tags")
    parser.add_argument("--limit", type=float, help="documents per task (or a fraction < 1): a quick, partial score")
    parser.add_argument("--batch-size", type=_batch_size, default=8, help="an integer or auto")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a directory of task YAMLs of your own (repeatable)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--output", help="results JSON (default <checkpoint>/eval/<tasks>.json)")
    parser.add_argument("--log-samples", action="store_true", help="also write per-document requests and responses")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    try:
        result = evaluate_checkpoint(
            args.checkpoint, args.tasks, limit=limit, batch_size=args.batch_size, device=args.device,
            num_fewshot=args.num_fewshot, include_path=args.include_path, backend=args.backend, dtype=args.dtype,
            output=args.output, log_samples=args.log_samples)
    except EvaluationError as exc:
        print(f"train.evaluate: {exc}", file=sys.stderr)
        return 2
    width = max(len(k) for k in result["metrics"]) if result["metrics"] else 0
    for key, value in result["metrics"].items():
        print(f"{key[len(PREFIX):]:<{width}}  {value:.4f}")
    print(result["output"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
