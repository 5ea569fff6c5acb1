"""Ranks in-process: run a function (the real trainer, or a piece of it) on N gloo ranks forked from a
process that has already imported torch, DeepSpeed and the trainer, as OLMo-core's
`run_distributed_test` does. A 2-rank run then costs its training steps, not N interpreter starts, imports
and a torchrun launch; the launchers themselves are tested by the door tests (`python -m train` and
`torchrun` as subprocesses).

    results = run_distributed(fn, world_size, *args)      # fn(*args) on every rank; per-rank results
    summary = train_in_ranks(overrides, world_size)       # the trainer, as `torchrun -m train` runs it

Ranks fork from a forkserver that preloaded the heavy modules and never ran a torch operation (forking
a process whose OpenMP pool is running can deadlock the children). Each rank gets the environment a
launcher gives (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), its log lines and its return value or
traceback come back to the test.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import socket
import traceback

PRELOAD = ["tests.ranks_preload"]
_context = None


def _mp():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(AssertionError):
    pass


def _rank_main(fn, args, rank: int, world: int, port: int, env: dict, queue) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)  # the ranks share the cores, as torchrun's OMP_NUM_THREADS=1 makes them
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        from train.cli import _setup_logging

        _setup_logging()
        logging.getLogger().addHandler(handler)
        value = fn(*args)
        queue.put((rank, True, value, log.getvalue()))
    except BaseException:  # a rank's failure (SystemExit included) is the test's to report
        queue.put((rank, False, traceback.format_exc(), log.getvalue()))


def run_distributed(fn, world_size: int, *args, env: dict | None = None, timeout: float = 600,
                    check: bool = True) -> list[dict]:
    """`fn(*args)` on `world_size` ranks; [{"ok", "value" (or the traceback), "log"}] in rank order.
    `fn` must be importable by name (a module-level function)."""
    ctx = _mp()
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, args, rank, world_size, port, dict(env or {}), queue))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    try:
        import queue as queue_module

        while len(results) < world_size:
            try:
                rank, ok, value, log = queue.get(timeout=timeout)
            except queue_module.Empty:
                raise RankFailed(f"no answer from ranks {sorted(set(range(world_size)) - set(results))} "
                                 f"within {timeout} s") from None
            results[rank] = {"ok": ok, "value": value, "log": log}
            if not ok and check:
                break  # the others may wait forever in a collective: stop them below
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    failed = [r for r, res in sorted(results.items()) if not res["ok"]]
    if failed and check:
        raise RankFailed(f"rank {failed[0]} failed:\n{results[failed[0]]['value']}\n--- its log ---\n"
                         f"{results[failed[0]]['log'][-5000:]}")
    return [results.get(r, {"ok": False, "value": "no answer", "log": ""}) for r in range(world_size)]


def train_ranks(overrides: list[str]) -> dict:
    """One rank of `torchrun -m train <overrides>`: compose as the CLI does, validate, train."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.cli import CONFIG_DIR, with_forced_model_keys
    from train.config import register_configs, validate
    from train.loop import train

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=with_forced_model_keys(list(overrides)))
    values = OmegaConf.to_container(cfg, resolve=True)
    summary = train(validate(values), values)
    return {k: (str(v) if k == "checkpoint" else v) for k, v in summary.items()}


def train_in_ranks(overrides: list[str], world_size: int = 2, env: dict | None = None, **kwargs) -> list[dict]:
    """The trainer on `world_size` in-process ranks; per rank {"ok", "value" (summary), "log"}."""
    return run_distributed(train_ranks, world_size, list(overrides), env=env, **kwargs)
