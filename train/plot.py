"""Plots of runs and sweeps from their `metrics.jsonl` (matplotlib, PNG, no display).

    python -m train.plot RUN_DIR [RUN_DIR ...] [-o FILE]    one figure; several runs are overlaid
    python -m train.plot SWEEP_DIR [-o DIR]                 a sweep: curves.png, final_eval_loss.png, summary.md

One run's figure (`<run_dir>/plots.png` by default) has, against steps unless said otherwise:
  * loss against tokens and loss against steps (train: solid line; eval: dashed with markers)
  * learning rate, gradient norm, tokens/s, MFU (%)
  * MoE runs (records with `aux_loss`): the aux loss, the busiest expert's load relative to a uniform
    share (`expert_load_max`) with the share of idle experts (`experts_idle`), and, when the records
    carry `expert_load` (per router, each expert's share of that step's picks), a router x expert
    heatmap of the last such record, coloured by load relative to uniform (1 = balanced); in an overlay,
    one heatmap for each of the first MAX_HEATMAPS MoE runs.
  * downstream scores (`lm_eval/<task>/<metric>` fields, see train.evaluate) against tokens, if any.
Several runs: one colour per run, and one legend beside the panels (inside one it would cover curves)
naming each run by its directory name, or, in a sweep, by its swept values under the swept keys.

A sweep directory is one whose subdirectories are runs (each with `metrics.jsonl` and `config.json`).
Its swept keys are the config keys whose values differ between points (run-identity keys such as
`trainer.output_dir` excepted). It gets:
  * curves.png: every point's curves overlaid (the figure above); the legend also lists, with an x,
    the points that have no run to draw (refused);
  * final_eval_loss.png: final eval loss against each swept key (numeric values on a log axis when
    they span more than 10x; other values as categories); a point without one is a red x at the foot
    of the panel, at its value, with its status;
  * summary.md: every point, in the order of its swept values (numbers by value): overrides (its swept
    keys), final train loss, final eval loss, tokens, wall time, status (finished: the newest complete
    checkpoint is at trainer.max_steps; unfinished: a checkpoint before that; failed: no checkpoint at
    all; refused: its config was refused, nothing ran) and why its latest attempt did not finish.
The points that left no run directory, and the reasons, come from the sweep's points ledger
(`<sweep dir>/points.jsonl`, train.ledger.record_point).
Wall time is the training time the trainer measured: the sum of the records' `train_seconds` (the
seconds of the run's own steps since its previous record; for records written before that field,
(tokens since the previous record) / tokens_per_sec). It leaves out evaluation, the set-up before the
first step, the gap before a resumed run went on, and a decay branch's stable run.

`plot_run` / `plot_runs` are what the trainer calls at the end of a run: any error is logged as a
warning and they return None, so plotting never fails a run. The CLI and `figure_for_runs` /
`plot_sweep` raise `PlotError` with the reason instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CONFIG = "config.json"
DPI = 100
# Keys that differ between sweep points by construction, not because they were swept.
IDENTITY_KEYS = {"trainer.output_dir", "logger.run_name", "logger.dir", "trainer.resume"}
DOWNSTREAM_PREFIX = "lm_eval/"
MAX_HEATMAPS = 4  # an overlay of a big MoE sweep would otherwise be one heatmap row per point


class PlotError(RuntimeError):
    """A run or sweep directory that cannot be plotted; the message names the directory and the problem."""


# ---------------------------------------------------------------------------------------------------
# Reading runs


def _number(value):
    """metrics.jsonl stores non-finite floats as strings ("nan", "inf"): back to floats."""
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(value)
    return value


@dataclass
class Run:
    path: Path
    records: list[dict]
    config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def series(self, key: str, x: str = "step") -> tuple[list, list]:
        """(x values, values) of the records that have `key`, in step order."""
        rows = [r for r in self.records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                and x in r]
        return [r[x] for r in rows], [float(r[key]) for r in rows]

    def has(self, key: str) -> bool:
        return any(key in r for r in self.records)

    def last(self, key: str):
        for r in reversed(self.records):
            if key in r:
                return r[key]
        return None

    @property
    def is_moe(self) -> bool:
        return self.has("aux_loss")

    def wall_time(self) -> float:
        """Seconds of training the trainer measured (see the module docstring)."""
        total, previous = 0.0, 0
        for r in self.records:
            tokens, rate, seconds = r.get("tokens"), r.get("tokens_per_sec"), r.get("train_seconds")
            if _is_number(seconds):
                total += seconds
            elif _is_number(tokens) and _is_number(rate) and rate > 0:
                # records written before train_seconds: the tokens since the previous record, which for the
                # first record of a run resumed from another run's checkpoint overstates its window
                total += (tokens - previous) / rate
            if _is_number(tokens):
                previous = tokens
        return total

    def downstream_keys(self) -> list[str]:
        return sorted({k for r in self.records for k in r if k.startswith(DOWNSTREAM_PREFIX)})


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such directory; pass a run directory (trainer.output_dir) or a sweep directory")
    if not path.is_file():
        raise PlotError(f"{run_dir}: no {METRICS} (not a run directory, or the run logged nothing yet)")
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # a line cut off by a killed run: the rest is still worth plotting
            continue
        if isinstance(record, dict) and "step" in record:
            records.append({k: _number(v) for k, v in record.items()})
    if bad:
        logger.warning("%s: skipped %d unreadable line(s)", path, bad)
    if not records:
        raise PlotError(f"{path}: no records with a step")
    records.sort(key=lambda r: r["step"])
    config = {}
    if (run_dir / CONFIG).is_file():
        try:
            config = json.loads((run_dir / CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise PlotError(f"{run_dir / CONFIG}: not valid JSON ({exc})") from None
    return Run(run_dir, records, config)


def is_sweep_dir(path: str | Path) -> bool:
    """A directory that is not itself a run and whose subdirectories include runs."""
    path = Path(path)
    return path.is_dir() and not (path / METRICS).is_file() and bool(sweep_points(path))


def sweep_points(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / METRICS).is_file())


# ---------------------------------------------------------------------------------------------------
# Figures


def _figure(**kwargs):
    """A matplotlib Figure, imported on first use (it costs about a second). No pyplot: no global
    figure registry or GUI backend in the trainer's process; savefig renders PNGs with Agg."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _line(ax, run: Run, key: str, x: str, color: str, label: str, scale: float = 1.0, **style):
    xs, ys = run.series(key, x)
    if not xs:
        return None
    (line,) = ax.plot(xs, [y * scale for y in ys], color=color, label=label, **style)
    line.set_gid(f"{run.name}:{key}:{x}")  # lets tests (and readers of the SVG) find a curve by what it shows
    return line


def _router_labels(run: Run, routers: int) -> list[str]:
    layers = (run.config.get("model") or {}).get("num_hidden_layers")
    if isinstance(layers, int) and layers > 0 and routers % layers == 0:
        per = routers // layers
        return [f"L{r // per}" if per == 1 else f"L{r // per}.{r % per}" for r in range(routers)]
    return [f"router {r}" for r in range(routers)]


def figure_for_runs(run_dirs, title: str | None = None, labels: dict[str, str] | None = None,
                    legend_title: str | None = None,
                    absent: list[tuple[str, str]] = ()) -> "matplotlib.figure.Figure":  # noqa: F821
    """The figure of one run or of several overlaid (see the module docstring); raises PlotError.
    Several runs share one legend beside the panels (a legend inside a panel covers its curves): each
    run's colour, named `labels[run name]` (default: the name) under `legend_title`, the line styles
    of train and eval loss, and an `x` for each of the `absent` points (label, status) that have no
    run to draw (a refused sweep point)."""
    from matplotlib.lines import Line2D

    runs = [r if isinstance(r, Run) else load_run(r) for r in run_dirs]
    if not runs:
        raise PlotError("no run directories given")
    labels = labels or {}
    moe = [r for r in runs if r.is_moe]
    heatmaps = [r for r in moe if r.has("expert_load")][:MAX_HEATMAPS]
    downstream = sorted({k for r in runs for k in r.downstream_keys()})
    rows = 3 + (1 if moe else 0) + (1 if downstream else 0)
    fig = _figure(figsize=(12, 3.2 * (rows + len(heatmaps))), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(rows + len(heatmaps), 2)
    panels = {}

    def panel(row, col, title, xlabel, ylabel, span=False):
        ax = fig.add_subplot(grid[row, :] if span else grid[row, col])
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        panels[title] = ax
        return ax

    loss_tokens = panel(0, 0, "loss vs tokens", "tokens", "loss")
    loss_steps = panel(0, 1, "loss vs steps", "step", "loss")
    lr = panel(1, 0, "learning rate", "step", "lr")
    grad = panel(1, 1, "grad norm", "step", "grad norm")
    speed = panel(2, 0, "tokens/s", "step", "tokens/s")
    mfu = panel(2, 1, "MFU", "step", "MFU (%)")
    row = 3
    if moe:
        aux = panel(row, 0, "aux loss", "step", "aux loss")
        load = panel(row, 1, "expert load", "step", "busiest expert / uniform (solid)")
        idle = load.twinx()
        idle.set_ylabel("idle experts (%, dotted)")
        row += 1
    if downstream:
        scores = panel(row, 0, "downstream", "tokens", "score", span=True)
        row += 1

    several = len(runs) > 1
    eval_style = {"linestyle": "--", "marker": "o", "markersize": 4}
    task_markers = {key: "os^vD<>"[j % 7] for j, key in enumerate(downstream)}
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        name = run.name
        for ax, x in ((loss_tokens, "tokens"), (loss_steps, "step")):
            _line(ax, run, "loss", x, color, "train")
            _line(ax, run, "eval_loss", x, color, "eval", **eval_style)
        _line(lr, run, "lr", "step", color, name)
        _line(grad, run, "grad_norm", "step", color, name)
        _line(speed, run, "tokens_per_sec", "step", color, name)
        _line(mfu, run, "mfu", "step", color, name, scale=100.0)
        if run.is_moe:
            _line(aux, run, "aux_loss", "step", color, name)
            _line(load, run, "expert_load_max", "step", color, name)
            _line(idle, run, "experts_idle", "step", color, name, scale=100.0, linestyle=":")
        for key in downstream:
            _line(scores, run, key, "tokens", color, key[len(DOWNSTREAM_PREFIX):], marker=task_markers[key],
                  linestyle="-")

    for ax in panels.values():
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
    if several:
        handles = [Line2D([], [], color=f"C{i % 10}", label=labels.get(run.name, run.name))
                   for i, run in enumerate(runs)]
        handles.append(Line2D([], [], color="gray", label="train loss"))
        if any(run.has("eval_loss") for run in runs):
            handles.append(Line2D([], [], color="gray", label="eval loss", **eval_style))
        handles += [Line2D([], [], color="gray", marker=m, label=key[len(DOWNSTREAM_PREFIX):])
                    for key, m in task_markers.items()]
        handles += [Line2D([], [], color="C3", marker="x", linestyle="none", label=f"{label} ({status})")
                    for label, status in absent]
        fig.legend(handles=handles, loc="outside right upper", title=legend_title, fontsize=8, title_fontsize=8,
                   ncols=1 + len(handles) // 40)
    else:  # one run: only the panels with more than one kind of line need a legend
        for ax in (loss_tokens, loss_steps, *([scores] if downstream else [])):
            if len(ax.lines) > 1:
                ax.legend(fontsize=8, loc="best")
    from matplotlib.ticker import MaxNLocator

    for ax in panels.values():
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on short runs
    for ax in (grad, speed):
        ys = [y for line in ax.lines for y in line.get_ydata()]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 100:
            ax.set_yscale("log")  # a first step's spike or slow start would flatten everything else

    for run in heatmaps:
        label = run.name if several else None
        panels["expert load heatmap" + (f" {label}" if label else "")] = _heatmap(fig, grid[row, :], run, label)
        row += 1
    if title is None:
        names = ", ".join(r.name for r in runs)
        # a long list of names says less than the legend beside the panels
        title = runs[0].name if not several else f"{len(runs)} runs" + (f": {names}" if len(names) <= 80 else "")
    fig.suptitle(title)
    fig.panels = panels  # title -> Axes, for callers and tests that look at what was drawn
    return fig


def _heatmap(fig, cell, run: Run, label: str | None):
    step, load = None, None
    for r in reversed(run.records):
        if isinstance(r.get("expert_load"), list):
            step, load = r["step"], r["expert_load"]
            break
    ax = fig.add_subplot(cell)
    routers, experts = len(load), max(len(row) for row in load)
    if any(len(row) != experts for row in load):
        raise PlotError(f"{run.path / METRICS}: expert_load at step {step} has rows of different lengths")
    relative = [[share * experts for share in row] for row in load]  # 1.0 = each expert gets 1/E of the picks
    image = ax.imshow(relative, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    ax.set_title(f"expert load at step {step}" + (f" ({label})" if label else "") + ": share of picks x experts "
                 "(1 = uniform)")
    ax.set_xlabel("expert")
    ax.set_ylabel("router")
    ax.set_yticks(range(routers), _router_labels(run, routers))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experts are whole: no tick at expert 0.5
    fig.colorbar(image, ax=ax, label="load / uniform")
    image.set_gid(f"{run.name}:expert_load")
    return ax


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    tmp.replace(out)  # a reader never sees half a PNG
    return out


def write_run_plots(run_dirs, out=None) -> Path:
    """Draw and save; raises PlotError. `out` defaults to `<first run>/plots.png`."""
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise PlotError("no run directories given")
    fig = figure_for_runs(run_dirs)
    return _save(fig, Path(out) if out else run_dirs[0] / "plots.png")


def plot_run(run_dir, out=None) -> Path | None:
    """`<run_dir>/plots.png` (or `out`); never raises: on any error, a warning and None."""
    return plot_runs([run_dir], out)


def plot_runs(run_dirs, out=None) -> Path | None:
    """Several runs overlaid in one PNG (default `<first run>/plots.png`); never raises."""
    try:
        return write_run_plots(run_dirs, out)
    except Exception as exc:  # plotting must never fail a training run
        logger.warning("plotting %s failed (%s: %s); the run itself is unaffected",
                       ", ".join(str(p) for p in run_dirs), type(exc).__name__, exc)
        return None


# ---------------------------------------------------------------------------------------------------
# Sweeps


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def swept_keys(runs: list[Run], absent: list[str] = ()) -> list[str]:
    """The keys swept: those in the points' names when a sweep named them (`point_overrides`, over the
    runs and the `absent` points' names), else the config keys whose values differ between points (a
    key missing from a point counts as differing)."""
    named = point_overrides([*runs, *absent])
    if named is not None:
        return sorted(next(iter(named.values())))
    flat = [_flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if k not in IDENTITY_KEYS
            and len({json.dumps(f[k] if k in f else "<unset>", sort_keys=True, default=str) for f in flat}) > 1]


def point_overrides(points) -> dict[str, dict] | None:
    """Each point's swept overrides, read back from its directory name (`model=doge-20m,optim.lr=0.001`:
    `python -m train --multirun` names points by the keys swept on the command line), when every point
    has such a name and they share their keys; else None. A swept config group (`model=a,b`) is then
    one key with the preset names as values, not every field in which the presets differ. `points`:
    runs or directory names."""
    import yaml

    named = {}
    for name in (p if isinstance(p, str) else p.name for p in points):
        pairs = [item.partition("=") for item in re.split(r",(?=[A-Za-z_][\w.]*=)", name)]
        if not all(sep and key for key, sep, _ in pairs):
            return None
        try:
            named[name] = {key: yaml.safe_load(value) for key, _, value in pairs}
        except yaml.YAMLError:
            named[name] = {key: value for key, _, value in pairs}
    if not named or len({tuple(sorted(v)) for v in named.values()}) != 1:
        return None
    return named


def point_status(run: Run) -> tuple[str, int | None]:
    """finished / unfinished / failed, from the newest complete checkpoint against trainer.max_steps."""
    from .checkpoint import MANIFEST, list_checkpoints, step_of

    complete = [p for p in list_checkpoints(run.path) if (p / MANIFEST).is_file()]
    last = step_of(complete[-1]) if complete else None
    max_steps = (run.config.get("trainer") or {}).get("max_steps")
    if last is None:
        return "failed", None
    if max_steps is not None and last >= max_steps:
        return "finished", last
    return "unfinished", last


def _format_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _format_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _format_loss(value) -> str:
    return "—" if value is None else f"{float(value):.4f}"


def _value_order(value) -> tuple:
    """Numbers by value (5 before 10), then everything else as text."""
    return (0, float(value), "") if _is_number(value) else (1, 0.0, _format_value(value))


def _name_order(name: str) -> list:
    """Digits by value: `point-5` before `point-10`."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def sweep_rows(runs: list[Run], keys: list[str], ledger: dict[str, dict] | None = None) -> list[dict]:
    """One row per point, in the order of its swept values: each run, and each point of the sweep's
    points ledger (`train.ledger.last_events`) that left no run (refused, or failed before its first
    record). `status`: finished / unfinished / failed from the run's checkpoints, or the ledger's event;
    `reason`: why the point's latest attempt did not finish (the ledger's), if it did not."""
    ledger = ledger or {}
    absent = [name for name in ledger if name not in {run.name for run in runs}]
    named = point_overrides([*runs, *absent]) or {}
    rows = []
    for run in runs:
        flat = named.get(run.name) or _flatten(run.config)
        status, last_checkpoint = point_status(run)
        rows.append({
            "point": run.name,
            "run": run,
            "overrides": {k: flat.get(k) for k in keys},
            "final_train_loss": run.last("loss"),
            "final_eval_loss": run.last("eval_loss"),
            "tokens": run.last("tokens"),
            "wall_time": run.wall_time(),
            "status": status,
            "last_checkpoint": last_checkpoint,
            "reason": _ledger_reason(ledger.get(run.name), status),
        })
    for name in absent:
        entry = ledger[name]
        flat = named.get(name, {})
        event = entry["event"]
        rows.append({
            "point": name, "run": None, "overrides": {k: flat.get(k) for k in keys}, "final_train_loss": None,
            "final_eval_loss": None, "tokens": None, "wall_time": None, "last_checkpoint": None,
            # started or resumed without an outcome: still running, or killed before its first record
            "status": event if event in ("refused", "failed") else "no record",
            "reason": entry.get("reason") if event in ("refused", "failed") else f"{event}, nothing logged yet",
        })
    rows.sort(key=lambda r: ([_value_order(v) for v in r["overrides"].values()], _name_order(r["point"])))
    return rows


def _ledger_reason(entry: dict | None, status: str) -> str | None:
    """Why a point that has a run did not finish this time, when the ledger says (failed, or refused at
    start). A point stopped on request needs none: `unfinished (step N)` says where it is."""
    if not entry or status == "finished" or entry["event"] not in ("refused", "failed"):
        return None
    return f"{entry['event']}: {entry.get('reason')}" if entry["event"] != status else entry.get("reason")


def _status_cell(row: dict) -> str:
    status = row["status"] + (f" (step {row['last_checkpoint']})" if row["status"] == "unfinished" else "")
    if row.get("reason"):
        status += f": {row['reason']}"
    return status.replace("|", "\\|").replace("\n", " ")  # one table cell


def summary_markdown(sweep_dir: Path, rows: list[dict], keys: list[str]) -> str:
    order = ["finished", "unfinished", "failed", "refused", "no record"]
    counts = {status: n for status in order if (n := sum(row["status"] == status for row in rows))}
    lines = [
        f"# Sweep {Path(sweep_dir).resolve().name}",
        "",
        f"{len(rows)} points ({', '.join(f'{n} {status}' for status, n in counts.items())}); swept keys: "
        f"{', '.join(keys) if keys else 'none (all configs are equal)'}.",
        "Wall time: training time measured by the trainer (the seconds of the run's own steps, summed over its "
        "logged records; time spent evaluating is not counted). Status: finished = the newest complete checkpoint "
        "is at trainer.max_steps; unfinished = an earlier checkpoint; failed = no checkpoint; refused = the point's "
        "config was refused, nothing ran; after a colon, why the point's latest attempt did not finish.",
        "",
        "| point | overrides | final train loss | final eval loss | tokens | wall time | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        overrides = ", ".join(f"{k}={_format_value(v)}" for k, v in row["overrides"].items()) or "—"
        tokens = "—" if row["tokens"] is None else f"{int(row['tokens'])}"
        wall = "—" if row["wall_time"] is None else _format_time(row["wall_time"])
        lines.append(f"| {row['point']} | {overrides} | {_format_loss(row['final_train_loss'])} | "
                     f"{_format_loss(row['final_eval_loss'])} | {tokens} | {wall} | {_status_cell(row)} |")
    return "\n".join(lines) + "\n"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sweep_figure(rows: list[dict], keys: list[str]):
    """Final eval loss (train loss if no point was evaluated) against each swept key; a point without
    one (refused, failed) is a red `x` on the axis at its value, with its status."""
    from matplotlib.transforms import blended_transform_factory

    metric = "final_eval_loss" if any(r["final_eval_loss"] is not None for r in rows) else "final_train_loss"
    shown = keys or ["(nothing swept)"]
    fig = _figure(figsize=(5 * len(shown), 4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)
    fig.panels = {}
    for ax, key in zip(axes[0], shown):
        ax.set_title(key)
        ax.set_xlabel(key)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, alpha=0.3)
        fig.panels[key] = ax
        if not rows or key not in rows[0]["overrides"]:
            ax.text(0.5, 0.5, "nothing to show", transform=ax.transAxes, ha="center", va="center", color="gray")
            continue
        values = [r["overrides"].get(key) for r in rows]
        if all(_is_number(v) for v in values):
            position = {id(r): float(r["overrides"][key]) for r in rows}
            xs = sorted(position.values())
            if min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
        else:
            categories = sorted({_format_value(v) for v in values}, key=lambda c: _value_order(
                next(v for v in values if _format_value(v) == c)))
            position = {id(r): categories.index(_format_value(r["overrides"].get(key))) for r in rows}
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        done = sorted((r for r in rows if r[metric] is not None), key=lambda r: position[id(r)])
        if done:
            (line,) = ax.plot([position[id(r)] for r in done], [float(r[metric]) for r in done], marker="o",
                              linestyle="-" if len(keys) == 1 else "none")
            line.set_gid(key)
            for r in done if len(keys) > 1 else ():  # the other swept values; this key's is on the axis
                ax.annotate(", ".join(f"{k}={_format_value(v)}" for k, v in r["overrides"].items() if k != key),
                            (position[id(r)], float(r[metric])), fontsize=7, textcoords="offset points", xytext=(3, 3))
        missing = [r for r in rows if r[metric] is None]
        if missing:
            if done:  # a band at the panel's foot for the marks, below every loss
                ys = [float(r[metric]) for r in done]
                span = (max(ys) - min(ys)) or abs(max(ys)) or 1.0
                ax.set_ylim(min(ys) - 0.3 * span, max(ys) + 0.1 * span)
            on_axis = blended_transform_factory(ax.transData, ax.transAxes)  # x: the value; y: the panel's foot
            (marks,) = ax.plot([position[id(r)] for r in missing], [0.06] * len(missing), transform=on_axis,
                               marker="x", markersize=9, color="C3", linestyle="none", clip_on=False)
            marks.set_gid(f"{key}:no {metric.replace('_', ' ')}")
            for x, status in dict.fromkeys((position[id(r)], r["status"]) for r in missing):
                ax.annotate(status, (x, 0.06), xycoords=on_axis, textcoords="offset points", xytext=(0, 7),
                            ha="center", fontsize=7, color="C3")
        ax.margins(x=0.1)
    return fig


def _labels(rows: list[dict], keys: list[str]) -> tuple[dict[str, str], str | None]:
    """Legend labels of a sweep's points: their swept values (the keys are the legend's title)."""
    if not keys:
        return {}, None
    labels = {r["point"]: ", ".join(_format_value(v) for v in r["overrides"].values()) for r in rows}
    return labels, ", ".join(keys)


def plot_sweep(sweep_dir, out_dir=None) -> dict[str, Path]:
    """curves.png, final_eval_loss.png and summary.md in `out_dir` (default: the sweep directory).
    Raises PlotError when no point can be read."""
    from .ledger import last_events

    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir else sweep_dir
    runs, skipped = [], []
    for point in sweep_points(sweep_dir):
        try:
            runs.append(load_run(point))
        except PlotError as exc:
            skipped.append(str(exc))
    for reason in skipped:
        logger.warning("sweep point skipped: %s", reason)
    if not runs:
        raise PlotError(f"{sweep_dir}: no subdirectory with a readable {METRICS} (not a sweep directory)")
    ledger = last_events(sweep_dir)
    keys = swept_keys(runs, [name for name in ledger if name not in {run.name for run in runs}])
    rows = sweep_rows(runs, keys, ledger)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(sweep_dir, rows, keys))
    labels, legend_title = _labels(rows, keys)
    absent = [(labels.get(r["point"], r["point"]), r["status"]) for r in rows if r["run"] is None]
    curves = figure_for_runs([r["run"] for r in rows if r["run"] is not None],
                             title=f"sweep {sweep_dir.resolve().name}: {len(rows)} points", labels=labels,
                             legend_title=legend_title, absent=absent)
    return {
        "curves": _save(curves, out_dir / "curves.png"),
        "final_eval_loss": _save(sweep_figure(rows, keys), out_dir / "final_eval_loss.png"),
        "summary": summary,
    }


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.plot",
        description="Plot runs (metrics.jsonl) as a PNG, overlaid when several; or a sweep directory.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (trainer.output_dir), or one sweep directory")
    parser.add_argument("-o", "--output", help="the PNG to write (runs; default <first run>/plots.png), or the "
                        "directory for a sweep's files (default: the sweep directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if len(args.dirs) == 1 and is_sweep_dir(args.dirs[0]):
            written = plot_sweep(args.dirs[0], args.output)
            for path in written.values():
                print(path)
        else:
            sweeps = [d for d in args.dirs if is_sweep_dir(d)]
            if sweeps:
                raise PlotError(f"{sweeps[0]} is a sweep directory: pass it alone (python -m train.plot {sweeps[0]})")
            print(write_run_plots(args.dirs, args.output))
    except PlotError as exc:
        print(f"train.plot: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
