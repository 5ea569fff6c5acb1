"""`python -m train.launch torchrun|deepspeed <that launcher's arguments>`: the launch scripts start the
ranks through this, so that a run under a launcher ends as a run in one process does, with its own
exit status (0 done, 1 failed, 2 refused, 75 stopped on request: requeue it) and its own message.

torchrun (`torch.distributed.run`) exits 1 whatever its ranks returned, after ~40 lines of
ChildFailedError; the deepspeed launcher exits 1 when it was signalled, whatever the ranks did. Here:

  * torchrun runs in this process (`torch.distributed.run.run`, the function its command line calls);
    its ChildFailedError becomes the failing rank's exit status, with one line for a failure (a refusal
    or a stop has said its own line already) and none of torchrun's report;
  * the deepspeed launcher (`deepspeed.launcher.runner`) runs as a child in a session of its own, and
    exits with the first failing rank's status (what its launch.py does with child statuses);
  * SIGTERM / SIGINT to this process reach the ranks as one SIGTERM each: they finish the step, save a
    checkpoint and exit 75, which becomes this process's status. (torchrun would turn the signal into a
    shutdown of its own that reports no rank's status; deepspeed's launch.py exits 1 on a signal.)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import psutil

from .cli import EXIT_REFUSED

EXIT_STOPPED = 75  # train.loop.EXIT_STOPPED (not imported: that imports the whole trainer)
EXIT_FAILED = 1


class _StopForwarder:
    """SIGTERM / SIGINT to this process: one SIGTERM to each rank that `ranks()` lists. A rank handles
    SIGINT too, but a second SIGINT (a terminal's Ctrl-C reaches the ranks themselves as well) would make it
    stop without a checkpoint, hence SIGTERM."""

    def __init__(self, ranks):
        self.ranks = ranks
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        ranks = self.ranks()
        if not ranks:  # none started yet: nothing to checkpoint
            raise SystemExit(EXIT_STOPPED)
        for process in ranks:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass


def rank_status(failures: dict) -> tuple[int, str | None]:
    """The run's exit status from torchrun's failures ({global rank: ProcessFailure}), and the line to
    print (None when the rank has said it: a refusal, a stop). A rank's own failure or refusal is the
    cause; the others' statuses (stopped by the launcher once one had failed) are consequences."""
    order = sorted(failures, key=lambda r: (failures[r].timestamp, r))
    causes = [r for r in order if failures[r].exitcode > 0 and failures[r].exitcode != EXIT_STOPPED]
    if causes:
        rank = causes[0]
        code = failures[rank].exitcode
        if code == EXIT_REFUSED:
            return code, None
        return code, f"launch: rank {rank} failed (exit status {code}); its messages are above"
    if any(failures[r].exitcode == EXIT_STOPPED for r in order):
        return EXIT_STOPPED, None
    rank = order[0]
    return EXIT_FAILED, f"launch: rank {rank} (pid {failures[rank].pid}) was killed by {failures[rank].signal_name()}"


def torchrun(argv: list[str]) -> int:
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torch_run.parse_args(argv)
    # torchrun's own handling of SIGTERM / SIGINT (its --signals-to-handle) is replaced by _StopForwarder
    args.signals_to_handle = ",".join(
        s for s in args.signals_to_handle.split(",") if s.strip() not in ("SIGTERM", "SIGINT")) or "SIGHUP"
    _StopForwarder(lambda: psutil.Process().children())  # the agent runs here: its workers are our children
    # the agent's log of a failed worker, and of stopping the others, repeats what rank_status says
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torch_run.run(args)
    except ChildFailedError as exc:
        code, line = rank_status(exc.failures)
        if line:
            print(line, file=sys.stderr)
        return code
    return 0


def _deepspeed_ranks(root: psutil.Process) -> list[psutil.Process]:
    """The ranks under the deepspeed runner: the children of its launch.py (not their own children, such
    as data loader workers)."""
    ranks = []
    for process in root.children(recursive=True):
        try:
            if "deepspeed.launcher.launch" in " ".join(process.cmdline()):
                ranks.extend(process.children())
        except psutil.Error:
            continue
    return ranks


def deepspeed(argv: list[str]) -> int:
    # A session of its own: a terminal's Ctrl-C reaches this process alone, not launch.py, which would
    # answer it by exiting 1 (and by killing ranks still saving after 30 s); the ranks get SIGTERM here.
    runner = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", *argv], start_new_session=True)
    _StopForwarder(lambda: _deepspeed_ranks(psutil.Process(runner.pid)))
    early = False
    while True:
        try:
            code = runner.wait()
            break
        except SystemExit:  # a stop before any rank started: the launcher's whole session stops
            early = True
            os.killpg(runner.pid, signal.SIGTERM)
    if early:
        return EXIT_STOPPED
    if code < 0:  # the runner itself was killed
        print(f"launch: the deepspeed launcher was killed by {signal.Signals(-code).name}", file=sys.stderr)
        return EXIT_FAILED
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launchers = {"torchrun": torchrun, "deepspeed": deepspeed}
    if not argv or argv[0] not in launchers:
        print(f"usage: python -m train.launch {{{','.join(launchers)}}} <the launcher's arguments>", file=sys.stderr)
        return EXIT_REFUSED
    return launchers[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
