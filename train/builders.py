"""The parts of a run, built top-down before anything is written: where it writes and what it continues
(`resolve_resume`, `claim_output_dir`), the data (`build_data`), the model (`build_model`), the engine
(`train.engines.build_engine`) and the state it resumes (`restore_state`); `build_run` puts them
together for the `Trainer` (train/loop.py). `python -m train`, the sweep launcher's points, the benchmarks
and the tests build runs from these, never by re-typing them.

Every check here raises RunConfigError (a refusal: exit status 2, nothing written); the output directory
is written only once `build_run` has returned.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import models
from data import (DataError, HeldOut, TokenLoader, build_tokenizer, check_vocab, eval_batches, log_mixture,
                  mixture_weights)
from data.pipeline import DataConfig, open_stream

from . import checkpoint
from .config import RunConfig, RunConfigError, check_layout, check_tokenizer_fits, data_config, is_unset
from .distributed import Topology
from .engines import Engine, build_engine
from .schedule import Schedule, build_schedule, is_branch

logger = logging.getLogger("train")


# ---------------------------------------------------------------------------------------------------
# Where the run writes, and what it continues


STATUS_FILE = "status"


def write_status(output_dir: Path, status: str) -> None:
    """<output_dir>/status: `running` once the run starts writing, then `stopped` (on request, after
    its checkpoint: continue it with trainer.resume=auto) or `finished`; a run that failed leaves
    `running`. For launchers, which under torchrun see only torchrun's exit status (1 whatever the
    ranks returned): launch/slurm.sbatch requeues a job whose run says `stopped`."""
    tmp = output_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(status + "\n")
    tmp.replace(output_dir / STATUS_FILE)


# What a run leaves in its output directory, besides config.json: another run's, when a run finds them.
RUN_FILES = ("metrics.jsonl", STATUS_FILE, "plots.png")


def check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise RunConfigError(f"trainer.output_dir={output_dir} is a file, not a directory; choose another path")


def resolve_resume(run: RunConfig, output_dir: Path) -> tuple[Path | None, list[Path]]:
    """The checkpoint to continue, and broken checkpoints of output_dir that `resume=auto` skipped."""
    resume = run.trainer.resume
    if is_unset(resume):
        return None, []
    try:
        if resume == "auto":
            found, corrupt = checkpoint.find_resumable(output_dir, run.trainer.verify_checksums)
            if found is None:
                logger.info("resume=auto: no complete checkpoint in %s; starting fresh", output_dir)
            return found, corrupt
        path = Path(resume)
        if not path.exists():
            raise RunConfigError(f"trainer.resume={resume}: no such checkpoint or run directory")
        if run.scheduler.branch_from_step is not None:
            path = _branch_checkpoint(path, run.scheduler.branch_from_step, resume)
        elif (path / "checkpoints").is_dir() and not checkpoint.STEP_DIR.match(path.name):
            path, _ = checkpoint.find_resumable(path, run.trainer.verify_checksums)  # a run directory
            if path is None:
                raise RunConfigError(f"trainer.resume={resume}: no complete checkpoint in that run directory")
        checkpoint.verify(path, run.trainer.verify_checksums)
    except checkpoint.CheckpointCorrupt as exc:
        raise RunConfigError(f"trainer.resume={resume}: {exc}") from None
    return path, []


def _branch_checkpoint(path: Path, step: int, resume: str) -> Path:
    """scheduler.branch_from_step=N with trainer.resume=<run dir>: that run's checkpoints/step-N."""
    if checkpoint.STEP_DIR.match(path.name):
        if checkpoint.step_of(path) != step:
            raise RunConfigError(f"trainer.resume={resume} is the step-{checkpoint.step_of(path)} checkpoint but "
                                 f"scheduler.branch_from_step={step}: name the run directory instead")
        return path
    found = path / "checkpoints" / f"step-{step}"
    if not found.is_dir():
        saved = ", ".join(p.name for p in checkpoint.list_checkpoints(path)) or "none"
        raise RunConfigError(
            f"scheduler.branch_from_step={step}: {path} has no checkpoint at step {step} (it has: {saved}). Branch "
            f"from a step it saved, or save the stable run with trainer.save_every dividing {step} and "
            f"trainer.keep_last=0 (keep every checkpoint)")
    return found


def _earlier_run(output_dir: Path) -> str | None:
    """What output_dir holds of a run (checkpoints by run id, metrics.jsonl, status), for messages; None
    when it holds none of it."""
    by_run: dict[str, list[str]] = {}
    for path in checkpoint.list_checkpoints(output_dir):
        by_run.setdefault(checkpoint.run_id_of(path) or "of unknown id", []).append(path.name)
    held = [f"run {run_id}: checkpoints {', '.join(names)}" for run_id, names in by_run.items()]
    if (output_dir / "metrics.jsonl").is_file():
        held.append("metrics.jsonl")
    if (output_dir / STATUS_FILE).is_file():
        held.append(f"status {(output_dir / STATUS_FILE).read_text().strip() or '(empty)'}")
    return "; ".join(held) or None


def claim_output_dir(run: RunConfig, output_dir: Path, resume_from: Path | None, corrupt: list[Path],
                      topology: Topology) -> str | None:
    """Another run's files in output_dir are never changed. A fresh run (trainer.resume unset) refuses a
    directory that holds a run, unless trainer.overwrite_output_dir (then it returns what it will remove).
    A continuing run refuses checkpoints of another run id at the steps it would save (saving and pruning
    would replace them), and, when it continues a checkpoint of another directory, any of them (that run's
    metrics.jsonl and status are in the directory too). Checked on every rank, the verdict taken
    together: nothing is written before every rank has looked."""
    t = run.trainer
    problem, overwrite = None, None
    if is_unset(t.resume):
        earlier = _earlier_run(output_dir)
        if earlier is not None and t.overwrite_output_dir:
            overwrite = earlier
        elif earlier is not None:
            problem = (f"trainer.output_dir={output_dir} holds another run ({earlier}). Continue it with "
                       f"trainer.resume=auto, choose another trainer.output_dir, or set "
                       f"trainer.overwrite_output_dir=true to remove that run's files and start afresh")
    else:
        saved = checkpoint.read_state(resume_from) if resume_from is not None else None
        run_id, start = (saved.get("run_id"), saved.get("step", 0)) if saved else (None, 0)
        schedule, _ = schedule_for(run, saved or {"step": 0}, resume_from is not None)
        others = [c for c in checkpoint.list_checkpoints(output_dir)
                  if c not in corrupt and (run_id is None or checkpoint.run_id_of(c) != run_id)]
        root = (output_dir / "checkpoints").resolve()
        elsewhere = resume_from is not None and root not in resume_from.resolve().parents
        last = schedule.total_steps
        colliding = others if elsewhere else [c for c in others if start < checkpoint.step_of(c) <= last]
        if colliding:
            names = ", ".join(f"{c.name} of run {checkpoint.run_id_of(c)}" for c in colliding)
            what = (f"this run continues {resume_from}, of another directory: its metrics.jsonl and status would "
                    f"replace that run's" if elsewhere else
                    f"this run would save its steps {start + 1}-{last} over them")
            problem = (f"trainer.output_dir={output_dir} holds checkpoints of another run ({names}) and {what}. "
                       f"Continue into another trainer.output_dir (with trainer.resume={resume_from or t.resume}), "
                       f"or move those checkpoints away")
    if topology.any(problem is not None):
        raise RunConfigError(problem or f"trainer.output_dir={output_dir}: refused on rank 0 (see its message)")
    return overwrite


def remove_earlier_run(output_dir: Path, what: str) -> None:
    """trainer.overwrite_output_dir=true: the earlier run's checkpoints, metrics.jsonl, status and plots go
    before this run writes its own."""
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    logger.warning("trainer.overwrite_output_dir=true: removed the earlier run's files from %s (%s)", output_dir, what)


def schedule_for(run: RunConfig, state: dict, resumed: bool):
    """The learning-rate schedule of a run and the step its decay branch starts at (None: no branch). A
    branch resumed from its own checkpoint (preempted, requeued) goes on with the decay it started: its
    checkpoints record the step the branch started at."""
    branch = is_branch(run.scheduler) and resumed
    branch_from = (run.scheduler.branch_from_step or state.get("branch_from") or state["step"]) if branch else None
    try:
        return build_schedule(run.scheduler, run.optim.lr, run.trainer.max_steps, branch_from=branch_from), branch_from
    except ValueError as exc:
        raise RunConfigError(str(exc)) from None


def gradient_accumulation(run: RunConfig, dp_size: int) -> int:
    t = run.trainer
    per_step = t.micro_batch_size * dp_size
    if t.global_batch_size % per_step:
        raise RunConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x data-parallel "
            f"replicas = {t.micro_batch_size} x {dp_size}; change one of them"
        )
    return t.global_batch_size // per_step


def configure_precision(run: RunConfig, topology: Topology) -> None:
    """TF32 on CUDA as trainer.tf32 says, and a warning for a precision that is slow on this device."""
    if topology.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = run.trainer.tf32
        torch.backends.cudnn.allow_tf32 = run.trainer.tf32
        if run.trainer.precision == "fp32":
            logger.warning(
                "trainer.precision=fp32 on a GPU: no flash attention (it needs bf16/fp16), JetMoE's experts without "
                "grouped GEMMs, %s. trainer.precision=bf16 (autocast, fp32 master weights; the default on a GPU "
                "with bf16) is several times faster", "TF32 matrix products (trainer.tf32)" if run.trainer.tf32
                else "full fp32 matrix products (trainer.tf32=false)")
    if run.trainer.precision == "bf16" and topology.device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "trainer.precision=bf16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16): bf16 matrix products "
            "are emulated and run many times slower than fp32 here. Use trainer.precision=fp32 on this machine; "
            "bf16 is for GPUs and bf16-capable CPUs.")


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: cannot tell, do not warn
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------------------------
# Data


@dataclass
class RunData:
    """What the run reads: the data config, held-out documents, tokenizer, this rank's training loader
    and its share of the evaluation batches."""

    config: DataConfig
    heldout: HeldOut
    tokenizer: object
    loader: TokenLoader
    evaluation: list


def _planned_vocab_size(run: RunConfig, resume_from: Path | None) -> tuple[int, str] | None:
    """The vocab_size of the model that will train, read before anything is built, and whose it is: the
    model group's, or that of the checkpoint or init_from directory's config.json (None: not local)."""
    source = resume_from or (Path(run.init_from) if run.init_from else None)
    if source is None:
        return run.model.vocab_size, "the model's"
    try:
        return int(models.read_config_json(source)["vocab_size"]), f"{source}'s"
    except (models.CheckpointError, KeyError, TypeError, ValueError):
        return None  # a hub id, or no readable config: loading the model says what is wrong


def build_data(run: RunConfig, topology: Topology, resume_from: Path | None) -> RunData:
    """The data config, held-out documents, tokenizer, training loader and evaluation batches, checked
    against the vocabulary of the model that will train (read before anything is built, so a BPE that
    cannot fit is refused before it is trained). Every problem found here is a refusal (nothing is
    written yet), and all of them are named at once: when one part fails, every source and the tokenizer
    are tried on their own (`_data_problems`)."""
    t = run.trainer
    vocab = _planned_vocab_size(run, resume_from)
    dcfg = None
    try:
        dcfg = data_config(run.data, t.micro_batch_size, t.seed)
        if vocab is not None:
            check_tokenizer_fits(dcfg.tokenizer, *vocab)
        if topology.is_main:
            log_mixture(dcfg.sources)
        heldout = HeldOut(dcfg)
        # the tokenizer cache is shared: one rank trains it, the others wait on its lock
        tokenizer = build_tokenizer(dcfg.tokenizer, dcfg.sources, heldout.exclude)
        loader = TokenLoader(dcfg, tokenizer, topology.dp_rank, topology.dp_size, heldout)
        evaluation = eval_batches(dcfg, tokenizer, heldout, topology.dp_rank, topology.dp_size) if t.eval_every else []
    except DataError as exc:
        problems = list(dict.fromkeys([str(exc), *(_data_problems(dcfg) if dcfg is not None else [])]))
        if len(problems) == 1:
            raise RunConfigError(problems[0]) from None
        raise RunConfigError(f"{len(problems)} problems with the data: "
                             + " ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))) from None
    return RunData(dcfg, heldout, tokenizer, loader, evaluation)


def _data_problems(dcfg) -> list[str]:
    """Each source read on its own (opened, its first document read) and a pretrained tokenizer loaded
    on its own: their problems are independent, and a user fixes them all in one go. (A BPE is trained
    on the sources: their problems are its problems.)"""
    problems = []
    try:
        sources = [*mixture_weights(dcfg.sources)[0], *(dcfg.eval.sources or [])]
    except DataError as exc:
        problems, sources = [str(exc)], []
    for source in sources:
        try:
            stream = open_stream(source, endless=False, read_batch=dcfg.read_batch)
            try:
                stream.next_document()
            finally:
                stream.close()
        except DataError as exc:
            problems.append(str(exc))
    if dcfg.tokenizer.name_or_path != "bpe":
        try:
            build_tokenizer(dcfg.tokenizer, [])
        except DataError as exc:
            problems.append(str(exc))
    return problems


# ---------------------------------------------------------------------------------------------------
# Model


def build_model(run: RunConfig, resume_from: Path | None, data: RunData) -> nn.Module:
    """A fresh model, or `init_from`'s weights, or the checkpoint's (whose config.json is the architecture:
    it may differ from the model group, e.g. after upcycling a dense model into a mixture of experts),
    checked against the layout and the tokenizer."""
    runtime = {f: getattr(run.model, f) for f in run.model.runtime_fields}
    if resume_from is not None:
        model = models.from_pretrained(resume_from, **runtime)
        if _architecture(model.config) != _architecture(run.model):
            logger.info("model architecture taken from %s/config.json (it differs from the model group)", resume_from)
    elif run.init_from:
        model = models.from_pretrained(run.init_from, **runtime)
        logger.info("weights from %s (a new run: fresh optimizer, schedule and data)", run.init_from)
    else:
        model = models.build(run.model)
    check_layout(run, model.config)
    try:
        check_vocab(data.tokenizer, model.config.vocab_size)
    except DataError as exc:
        raise RunConfigError(str(exc)) from None
    if data.config.seq_len > model.config.max_position_embeddings:
        logger.warning("data.seq_len=%d exceeds the model's max_position_embeddings=%d: positions beyond it are "
                       "extrapolated (set model.max_position_embeddings, or a shorter data.seq_len)",
                       data.config.seq_len, model.config.max_position_embeddings)
    return model


def _architecture(config) -> dict:
    """A model config without its token ids (checkpoints carry the tokenizer's; presets may not)."""
    return {k: v for k, v in config.to_hf_dict().items() if k not in checkpoint.TOKEN_ID_FIELDS}


# ---------------------------------------------------------------------------------------------------
# State


def restore_state(run: RunConfig, engine: Engine, data: RunData, topology: Topology, resume_from: Path | None,
                  config_dict: dict) -> dict:
    """The run's state: fresh, or the checkpoint's (engine, loader and RNG restored in place). A refused
    resume stops here, before anything is written."""
    state = {"step": 0, "tokens": 0, "bad_steps": 0, "skipped_steps": 0, "run_id": uuid.uuid4().hex[:12],
             "schedule": None}
    if resume_from is not None:
        restoring = time.perf_counter()
        state.update(checkpoint.load(resume_from, engine, data.loader, topology, run_config=config_dict))
        state.pop("optimizer_state", None)  # from here on, checkpoints carry the optimizer
        logger.info("resumed from %s at step %d (training state restored in %.1f s)", resume_from, state["step"],
                    time.perf_counter() - restoring)
    if run.optim.new_params_only_steps and state.get("upcycled_at") is None:
        raise RunConfigError(
            f"optim.new_params_only_steps={run.optim.new_params_only_steps}, but "
            f"{resume_from or 'this run'} does not continue an upcycled checkpoint (python -m train.upcycle)")
    if is_branch(run.scheduler) and resume_from is None:
        raise RunConfigError("scheduler.branch_decay_steps / branch_decay_fraction start a decay branch from a "
                             "checkpoint: set trainer.resume")
    return state


def check_eval_tasks(run: RunConfig, topology: Topology) -> None:
    """A bad `trainer.eval_tasks` (unknown task, dataset out of reach offline) stops the run before it
    trains; rank 0 checks, every rank learns the verdict."""
    if not run.trainer.eval_tasks:
        return
    problem = None
    if topology.is_main:
        from .evaluate import EvaluationError, check_tasks

        try:
            check_tasks(run.trainer.eval_tasks, run.trainer.eval_tasks_include_path)
        except EvaluationError as exc:
            problem = f"trainer.eval_tasks={list(run.trainer.eval_tasks)}: {exc}"
    if topology.any(problem is not None):
        raise RunConfigError(problem or "trainer.eval_tasks: refused on rank 0 (see its message)")


# ---------------------------------------------------------------------------------------------------
# The whole run


@dataclass
class RunParts:
    """Everything a Trainer runs, built and checked; nothing written yet."""

    run: RunConfig
    topology: Topology
    config_dict: dict  # what config.json records (a decay branch's: where it ends)
    data: RunData
    engine: Engine
    model_config: object
    flops_per_token: float
    num_parameters: int
    active_parameters: int
    state: dict
    schedule: Schedule
    branch: bool  # a decay branch from the checkpoint it resumed
    accumulation: int
    resume_from: Path | None = None
    corrupt: list = field(default_factory=list)  # broken checkpoints resume=auto skipped (moved aside at start)
    overwrite: str | None = None  # trainer.overwrite_output_dir: the earlier run's files to remove at start

    @property
    def output_dir(self) -> Path:
        return Path(self.run.trainer.output_dir)

    @property
    def only_new_until(self) -> int:
        """The step before which only the upcycled parameters learn (optim.new_params_only_steps)."""
        return (self.state.get("upcycled_at") or 0) + self.run.optim.new_params_only_steps


def build_run(run: RunConfig, topology: Topology, config_dict: dict | None = None) -> RunParts:
    """Every part of the run, in order, with every check before anything is written."""
    config_dict = config_dict or {}
    output_dir = Path(run.trainer.output_dir)
    accumulation = gradient_accumulation(run, topology.dp_size)
    configure_precision(run, topology)
    torch.manual_seed(run.trainer.seed)
    resume_from, corrupt = resolve_resume(run, output_dir)
    overwrite = claim_output_dir(run, output_dir, resume_from, corrupt, topology)
    data = build_data(run, topology, resume_from)
    model = build_model(run, resume_from, data)
    model_config = model.config
    flops_per_token = model.flops_per_token(data.config.seq_len)
    num_parameters, active_parameters = model.num_parameters(), model.active_parameters()
    engine = build_engine(run, model, topology, accumulation)
    del model  # the engine holds what this rank keeps of it (a pipeline stage: its own layers)
    state = restore_state(run, engine, data, topology, resume_from, config_dict)
    branch = is_branch(run.scheduler) and resume_from is not None
    schedule, state["branch_from"] = schedule_for(run, state, branch)
    if branch and "trainer" in config_dict:  # config.json states where this run ends (plots, sweep status)
        config_dict = {**config_dict, "trainer": {**config_dict["trainer"], "max_steps": schedule.total_steps}}
    state["schedule"] = schedule.describe()
    check_eval_tasks(run, topology)
    return RunParts(run, topology, config_dict, data, engine, model_config, flops_per_token, num_parameters,
                    active_parameters, state, schedule, branch, accumulation, resume_from, corrupt, overwrite)
