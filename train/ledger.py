"""The points ledger of a sweep, `<sweep dir>/points.jsonl`: what each point does or did. Written by
train.sweep and the torchrun launcher, read by train.sweep (the console) and train.plot (summary.md)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger("train.sweep")


LEDGER = "points.jsonl"


def record_point(sweep_dir: Path, job: int, point_dir: Path, event: str, message: str, **fields) -> None:
    """One line of `<sweep dir>/points.jsonl`: a point (job number, directory), what it does or did
    (`event`: started, resumed, skipped, refused, failed, stopped, finished), the sentence the console
    shows for it, and its `step` or `reason`. Written by whichever process plans or runs the point: the
    torchrun launcher in the sweep's own process, or the point's job (submitit, basic) through
    `SweepSummary`'s job callbacks. It is how the sweep's process learns what points running elsewhere
    do (`SweepSummary` shows their lines on its console), and how summary.md lists the points that left
    no run behind (refused). One short line per `write` in append mode: concurrent jobs do not mix
    their lines. Never raises: the ledger must not fail a point."""
    entry = {"job": int(job), "point": Path(point_dir).name, "dir": str(point_dir), "event": event,
             "message": message, "pid": os.getpid(), "time": round(time.time(), 3), **fields}
    try:
        with open(Path(sweep_dir) / LEDGER, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
    except OSError as exc:
        logger.warning("could not record point #%s in %s (%s)", job, Path(sweep_dir) / LEDGER, exc)


def read_ledger(sweep_dir: Path) -> list[dict]:
    """The ledger's entries in the order they were written (a line cut off by a killed job is skipped)."""
    try:
        lines = (Path(sweep_dir) / LEDGER).read_text().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "point" in entry and "event" in entry:
            entries.append(entry)
    return entries


def last_events(sweep_dir: Path) -> dict[str, dict]:
    """Per point directory name, the newest ledger entry of the sweep's latest run."""
    return {entry["point"]: entry for entry in read_ledger(sweep_dir)}


def outcome_message(point_dir: Path, event: str, step=None, reason=None) -> str:
    if event in ("finished", "stopped"):
        return f"{point_dir}: {event} at step {step}" + (" (run the sweep again to continue it)" if event == "stopped"
                                                          else "")
    return f"{point_dir}: {event}: {reason}"
