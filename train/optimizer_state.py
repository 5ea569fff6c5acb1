"""AdamW state keyed by Hugging Face parameter name: one format (`optimizer.pt`, "adamw-by-name") for
every engine, so that a checkpoint resumes under another layout (pipeline stages, expert-parallel
size, DeepSpeed or not) and after parameters are added (upcycling).

    {"format": "adamw-by-name", "state": {name: {"step", "exp_avg", "exp_avg_sq"[, "fp32_param"]}}}

Under DeepSpeed ZeRO-1/2 and its bf16 optimizer the state lives in flat partitions; DeepSpeed's own
tensor-fragment API (`safe_get_full_optimizer_state` / `safe_set_full_optimizer_state`) reads and
writes it per parameter (collectively over the parameter's data-parallel group).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

FORMAT = "adamw-by-name"
FILE = "optimizer.pt"


def write(directory: Path, state: dict) -> None:
    torch.save({"format": FORMAT, "state": state}, directory / FILE)


def read(directory: Path, map_location="cpu") -> dict:
    saved = torch.load(directory / FILE, map_location=map_location, weights_only=True)
    if saved.get("format") != FORMAT:
        raise RuntimeError(f"{directory / FILE}: not an optimizer state this trainer wrote")
    return saved["state"]


def saved_step(state: dict):
    steps = [s["step"] for s in state.values() if "step" in s]
    return max(steps, key=float) if steps else None


def load_into_torch(optimizer: torch.optim.Optimizer, names: dict[int, str], saved: dict) -> None:
    """Restore per-parameter AdamW state by name into a torch optimizer. A parameter the saved state does
    not know (a new expert after upcycling) starts with zero moments at the saved step count, so its
    first updates are damped like the others' rather than a full bias-corrected step."""
    step = saved_step(saved)
    current = {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
    unknown = sorted(set(saved) - set(current))
    if unknown:
        raise RuntimeError(f"optimizer state for parameters this model does not have: {unknown[:5]}")
    for name, param in current.items():
        if name in saved:
            optimizer.state[param] = {k: (v.to(param.device) if torch.is_tensor(v) else v) for k, v in saved[name].items()}
        elif step is not None:
            optimizer.state[param] = {
                "step": step.clone() if torch.is_tensor(step) else step,
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }


def gather_on_rank0(obj: dict, world_size: int, is_main: bool) -> dict:
    """Merge the dicts of every rank on rank 0 (others get {}); a key given twice keeps the first (a tied
    weight comes from the first and the last pipeline stage)."""
    if world_size == 1:
        return obj
    gathered = [None] * world_size if is_main else None
    dist.gather_object(obj, gathered, dst=0)
    if not is_main:
        return {}
    out = {}
    for part in gathered:
        for key, value in part.items():
            out.setdefault(key, value)
    return out


# ---------------------------------------------------------------------------------------------------
# DeepSpeed optimizers


def link_fragments(optimizer, step=None) -> None:
    """Make DeepSpeed's per-parameter views of its flat optimizer state complete. ZeRO-1/2 and the bf16
    optimizer link them once, right after the first step of the first parameter group, so the views of
    the other groups stay empty (DeepSpeed 0.19.8); before any step there is no state at all to view.
    Create what is missing (zero moments at `step`, for loading) and link again."""
    relink = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if relink is None:
        return
    inner = optimizer.optimizer
    for group in inner.param_groups:
        for flat in group["params"]:
            state = inner.state[flat]
            if not state:
                count = step if step is not None else 0.0
                state["step"] = count.clone().float() if torch.is_tensor(count) else torch.tensor(float(count))
                state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    optimizer._hp_optimizer_states_linked = False
    relink()


def param_state(optimizer, param) -> dict:
    """One parameter's AdamW state (exp_avg, exp_avg_sq, step), from a torch optimizer or assembled from
    DeepSpeed's partitions (collective over the parameter's data-parallel group under ZeRO)."""
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 / bf16: fragments of flat fp32 partitions
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        state = {key: safe_get_full_optimizer_state(param, key).cpu() for key in ("exp_avg", "exp_avg_sq")}
        state["step"] = _step_count(optimizer)
        if param.dtype != torch.float32:
            state["fp32_param"] = safe_get_full_fp32_param(param).cpu()
        return state
    inner = getattr(optimizer, "optimizer", optimizer)
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in inner.state.get(param, {}).items()}


def set_param_state(optimizer, param, state: dict) -> None:
    if hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                safe_set_full_optimizer_state(param, state[key].to(param.device), key)
        if "fp32_param" in state:
            safe_set_full_fp32_param(param, state["fp32_param"].to(param.device))
        _set_step_count(optimizer, state.get("step"))
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.state[param] = {k: (v.to(param.device) if torch.is_tensor(v) else v) for k, v in state.items()}


def _inner_states(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner.state.values()


def _step_count(optimizer):
    for state in _inner_states(optimizer):
        if "step" in state:
            step = state["step"]
            return step.clone().cpu() if torch.is_tensor(step) else step
    return torch.tensor(0.0)


def _set_step_count(optimizer, step) -> None:
    if step is None:
        return
    for state in _inner_states(optimizer):
        if "step" in state:
            state["step"] = step.clone().to(state["step"].device) if torch.is_tensor(state["step"]) else float(step)
