"""`python -m tests.train.faults FAULT N [overrides]`: the trainer's own entry point (`python -m train`)
with one fault injected, for tests of what a real run must survive. Works under torchrun too.

    kill-after-checkpoint N   the process SIGKILLs itself right after the step-N checkpoint is saved
    nan-after N               every cross-entropy computed after the first N is NaN
    cpu-without-bf16 0        the CPU reports no native bf16 (as an AVX2-only one does)
"""

import os
import signal
import sys

import models.base
import train.checkpoint as checkpoint
import train.loop

FAULT, N = sys.argv.pop(1), int(sys.argv.pop(1))

if FAULT == "kill-after-checkpoint":
    _save = checkpoint.save

    def _save_then_die(output_dir, step, *args, **kwargs):
        path = _save(output_dir, step, *args, **kwargs)
        if step == N:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpoint.save = _save_then_die
elif FAULT == "nan-after":
    _cross_entropy_sum = models.base.linear_cross_entropy_sum
    _calls = [0]

    def _poisoned(*args, **kwargs):
        _calls[0] += 1
        value = _cross_entropy_sum(*args, **kwargs)
        return value * float("nan") if _calls[0] > N else value

    models.base.linear_cross_entropy_sum = _poisoned
elif FAULT == "cpu-without-bf16":
    train.loop.cpu_has_native_bf16 = lambda: False
else:
    raise SystemExit(f"unknown fault {FAULT!r}")

if __name__ == "__main__":
    from train.cli import main

    main()
