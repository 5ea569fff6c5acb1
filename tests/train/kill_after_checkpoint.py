"""`python -m tests.train.kill_after_checkpoint N [overrides]`: the trainer's own entry point
(`python -m train`), except that the process SIGKILLs itself right after the step-N checkpoint is
saved: a crash at the worst moment, for the exact-resume tests. Works under torchrun too."""

import os
import signal
import sys

import train.checkpoint as checkpoint

KILL_AFTER = int(sys.argv.pop(1))
_save = checkpoint.save


def _save_then_die(output_dir, step, *args, **kwargs):
    path = _save(output_dir, step, *args, **kwargs)
    if step == KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


checkpoint.save = _save_then_die

if __name__ == "__main__":
    from train.cli import main

    main()
