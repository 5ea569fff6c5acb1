"""`python -m tests.train.faults FAULT N [overrides]`: the trainer's own entry point (`python -m train`)
with one fault injected, for tests of what a real run must survive. Works under torchrun too, and on
in-process ranks: `run_distributed(train_with_fault, 2, FAULT, N, overrides)` (tests/ranks.py).

    kill-after-checkpoint N   the process SIGKILLs itself right after the step-N checkpoint is saved
    nan-after N               every cross-entropy computed after the first N is NaN
    cpu-without-bf16 0        the CPU reports no native bf16 (as an AVX2-only one does)
    host-tensors-in-collectives 0   `.cpu()` copies (as on a GPU) and collectives refuse them (as NCCL does)
    busy-peak N               the first N peak-FLOPs measurements see a machine 1000x slower (as when another
                              process has the CPU while the MFU's peak is measured)
    h100-name 0               the run's device is named as an H100 is (the MFU's peak is looked up by name)
    collective-in-flight-at-exit N   after training, N all-reduces whose handles are dropped: gloo's worker
                              threads hold their tensors while the process ends (as they hold a finished
                              collective's for a moment after it returns, a moment a loaded machine stretches)
"""

import os
import signal
import sys

import models.base
import train.checkpoint as checkpoint
import train.builders
import train.loop
import train.metrics


def inject(fault: str, n: int) -> None:
    """Patch this process so that `fault` happens (`n` as the table above says)."""
    if fault == "kill-after-checkpoint":
        _save = checkpoint.save

        def _save_then_die(output_dir, step, *args, **kwargs):
            path = _save(output_dir, step, *args, **kwargs)
            if step == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        checkpoint.save = _save_then_die
    elif fault == "nan-after":
        _cross_entropy_sum = models.base.linear_cross_entropy_sum
        _calls = [0]

        def _poisoned(*args, **kwargs):
            _calls[0] += 1
            value = _cross_entropy_sum(*args, **kwargs)
            return value * float("nan") if _calls[0] > n else value

        models.base.linear_cross_entropy_sum = _poisoned
    elif fault == "cpu-without-bf16":
        train.builders.cpu_has_native_bf16 = lambda: False
    elif fault == "busy-peak":
        _measure = train.metrics.measured_peak_flops
        _measured = [0]

        def _busy(*args, **kwargs):
            _measured[0] += 1
            return _measure(*args, **kwargs) / (1000 if _measured[0] <= n else 1)

        train.metrics.measured_peak_flops = _busy
    elif fault == "h100-name":
        train.metrics.gpu_name = lambda device: "NVIDIA H100 80GB HBM3"  # torch.cuda.get_device_name on an H100 SXM
    elif fault == "host-tensors-in-collectives":
        # As on a GPU, where `.cpu()` is a copy on another device and NCCL refuses host tensors: every `.cpu()`
        # returns a marked copy, and a collective handed a marked tensor fails the run.
        import torch
        import torch.distributed as dist

        _cpu = torch.Tensor.cpu

        def _marked_copy(self, *args, **kwargs):
            copy = _cpu(self, *args, **kwargs).clone()
            copy.moved_to_host = True
            return copy

        def _checked(collective):
            def call(*args, **kwargs):
                for value in [*args, *kwargs.values()]:
                    for t in value if isinstance(value, (list, tuple)) else [value]:
                        if getattr(t, "moved_to_host", False):
                            raise RuntimeError(f"{collective.__name__} was handed a tensor moved to the host (.cpu()): "
                                               f"NCCL refuses it on a GPU")
                return collective(*args, **kwargs)
            return call

        torch.Tensor.cpu = _marked_copy
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce",
                     "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv"):
            setattr(dist, name, _checked(getattr(dist, name)))
    elif fault == "collective-in-flight-at-exit":
        import torch
        import torch.distributed as dist

        _fit = train.loop.Trainer.fit

        def _fit_then_leave_collectives(*args, **kwargs):
            summary = _fit(*args, **kwargs)
            for _ in range(n):
                dist.all_reduce(torch.ones(1 << 16), async_op=True)  # the handle is dropped at once
            return summary

        train.loop.Trainer.fit = _fit_then_leave_collectives
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def train_with_fault(fault: str, n: int, overrides: list[str]) -> dict:
    """One in-process rank of the trainer with `fault` injected (a forked rank: the patches die with it)."""
    from tests.ranks import train_ranks

    inject(fault, n)
    return train_ranks(overrides)


if __name__ == "__main__":
    fault, count = sys.argv.pop(1), int(sys.argv.pop(1))
    inject(fault, count)
    from train.cli import main

    main()
