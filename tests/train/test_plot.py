"""train.plot: figures drawn from the runs' metrics (the plotted points are the records, the axes follow
the data, the PNG is a real image of the figure's size), MoE panels and the expert heatmap, overlays,
sweeps (swept keys, log axes, summary.md numbers and statuses), errors that never fail a run, and the
CLI on a real tiny MoE run."""

from __future__ import annotations

import json
import logging
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from train import plot

from .conftest import FAST, REPO, metrics, run_train

pytest.importorskip("matplotlib")


# ---------------------------------------------------------------------------------------------------
# Hand-written runs


def _records(steps=10, eval_every=5, moe=False, experts=8, routers=2, seed=0, scale=1.0, tokens_per_step=512):
    out = []
    for step in range(1, steps + 1):
        r = {"step": step, "loss": scale * (8.0 - 0.3 * step + 0.01 * seed), "lr": 1e-3 * min(1.0, step / 3),
             "grad_norm": 1.0 + 0.1 * step, "tokens": step * tokens_per_step, "tokens_per_sec": 1000.0 + 10 * step,
             "mfu": 0.01 * step, "skipped_steps": 0}
        if moe:
            r.update(aux_loss=1.0 + 0.01 * step, expert_load_max=1.5 + 0.1 * step, experts_idle=0.125 * (step % 2))
            if step % eval_every == 0:
                # router r gives expert e a share growing with e (and r), normalised per router
                raw = [[(e + 1) * (i + 1) + step for e in range(experts)] for i in range(routers)]
                r["expert_load"] = [[v / sum(row) for v in row] for row in raw]
        if step % eval_every == 0:
            r.update(eval_loss=r["loss"] + 0.2, eval_ppl=math.exp(r["loss"] + 0.2))
        out.append(r)
    return out


def _write_run(path: Path, records, config=None, checkpoint_steps=()):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = config or {"model": {"num_hidden_layers": 2}, "trainer": {"max_steps": records[-1]["step"]}}
    (path / "config.json").write_text(json.dumps(config))
    for step in checkpoint_steps:
        ckpt = path / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "MANIFEST.json").write_text('{"files": {}}')
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _line(ax, gid):
    found = [line for line in ax.lines if line.get_gid() == gid]
    assert len(found) == 1, f"no single line {gid!r} in {ax.get_title()!r}: {[l.get_gid() for l in ax.lines]}"
    return found[0]


def _image_is_drawn(path: Path, size):
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (size[1], size[0])
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


# ---------------------------------------------------------------------------------------------------
# One run, several runs


def test_run_figure_plots_every_record_and_the_axes_follow_the_data(tmp_path):
    records = _records(steps=10, eval_every=5)
    run = _write_run(tmp_path / "dense", records)
    fig = plot.figure_for_runs([run])
    panels = fig.panels
    assert {"loss vs tokens", "loss vs steps", "learning rate", "grad norm", "tokens/s", "MFU"} <= set(panels)
    assert not {"aux loss", "expert load"} & set(panels)  # a dense run has no MoE panels

    train = _line(panels["loss vs tokens"], "dense:loss:tokens")
    assert list(train.get_xdata()) == [r["tokens"] for r in records]
    assert list(train.get_ydata()) == [r["loss"] for r in records]
    evals = _line(panels["loss vs tokens"], "dense:eval_loss:tokens")
    assert list(evals.get_xdata()) == [r["tokens"] for r in records if "eval_loss" in r] == [2560, 5120]
    assert list(_line(panels["loss vs steps"], "dense:loss:step").get_xdata()) == list(range(1, 11))
    assert list(_line(panels["learning rate"], "dense:lr:step").get_ydata()) == [r["lr"] for r in records]
    assert list(_line(panels["MFU"], "dense:mfu:step").get_ydata()) == pytest.approx([100 * r["mfu"] for r in records])

    # the limits enclose the data with only a margin around it
    lo, hi = panels["loss vs tokens"].get_xlim()
    assert lo <= 512 and hi >= 5120 and hi - lo < 1.2 * (5120 - 512)
    losses = [r["loss"] for r in records] + [r["eval_loss"] for r in records if "eval_loss" in r]
    lo, hi = panels["loss vs steps"].get_ylim()
    assert lo <= min(losses) and hi >= max(losses) and hi - lo < 1.2 * (max(losses) - min(losses))

    out = plot.plot_run(run)
    assert out == run / "plots.png"
    size = _png_size(out)
    assert size == (round(fig.get_figwidth() * plot.DPI), round(fig.get_figheight() * plot.DPI)) == (1200, 960)
    _image_is_drawn(out, size)


def test_moe_run_gets_aux_loss_load_panels_and_a_router_by_expert_heatmap(tmp_path):
    records = _records(steps=6, eval_every=3, moe=True, experts=8, routers=4)
    config = {"model": {"num_hidden_layers": 2}, "trainer": {"max_steps": 6}}  # 2 routers per layer (JetMoE-like)
    run = _write_run(tmp_path / "moe", records, config)
    fig = plot.figure_for_runs([run])
    panels = fig.panels
    assert list(_line(panels["aux loss"], "moe:aux_loss:step").get_ydata()) == [r["aux_loss"] for r in records]
    assert list(_line(panels["expert load"], "moe:expert_load_max:step").get_ydata()) == [
        r["expert_load_max"] for r in records]
    heatmap = panels["expert load heatmap"]
    assert "step 6" in heatmap.get_title()  # the last record that carries expert_load
    (image,) = heatmap.get_images()
    shown = image.get_array()
    assert shown.shape == (4, 8)
    expected = [[share * 8 for share in row] for row in records[-1]["expert_load"]]
    numpy.testing.assert_allclose(shown, expected)
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["L0.0", "L0.1", "L1.0", "L1.1"]
    size = _png_size(plot.plot_run(run, tmp_path / "moe.png"))
    assert size == (1200, round(3.2 * 5 * plot.DPI))  # 3 rows + the MoE row + the heatmap row


def test_several_runs_are_overlaid_one_colour_each_with_a_legend_by_name(tmp_path):
    runs = [_write_run(tmp_path / name, _records(seed=i, scale=1 + 0.1 * i)) for i, name in enumerate(["lr-1e-3", "lr-3e-3", "lr-1e-2"])]
    fig = plot.figure_for_runs(runs)
    ax = fig.panels["learning rate"]
    colours = {line.get_gid().split(":")[0]: line.get_color() for line in ax.lines}
    assert set(colours) == {"lr-1e-3", "lr-3e-3", "lr-1e-2"} and len(set(colours.values())) == 3
    # one legend beside the panels: each run's colour, then the line styles of train and eval loss
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["lr-1e-3", "lr-3e-3", "lr-1e-2", "train loss", "eval loss"]
    assert [h.get_color() for h in legend.legend_handles[:3]] == [colours[n] for n in ("lr-1e-3", "lr-3e-3", "lr-1e-2")]
    assert all(panel.get_legend() is None for panel in fig.panels.values())
    assert fig._suptitle.get_text() == "3 runs: lr-1e-3, lr-3e-3, lr-1e-2"
    for i, run in enumerate(runs):  # each run's own numbers, in its own colour
        line = _line(fig.panels["loss vs steps"], f"{run.name}:loss:step")
        assert list(line.get_ydata()) == [r["loss"] for r in _records(seed=i, scale=1 + 0.1 * i)]
        assert line.get_color() == colours[run.name]
    out = plot.plot_runs(runs, tmp_path / "all.png")
    _image_is_drawn(out, _png_size(out))


def test_downstream_scores_get_a_panel(tmp_path):
    records = _records(steps=4, eval_every=2)
    records[1]["lm_eval/arc_easy/acc"] = 0.25
    records[3]["lm_eval/arc_easy/acc"] = 0.5
    fig = plot.figure_for_runs([_write_run(tmp_path / "r", records)])
    line = _line(fig.panels["downstream"], "r:lm_eval/arc_easy/acc:tokens")
    assert list(line.get_xdata()) == [1024, 2048] and list(line.get_ydata()) == [0.25, 0.5]


def test_plot_run_never_raises_it_warns_and_returns_none(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="train.plot")
    assert plot.plot_run(tmp_path / "missing") is None
    assert "no such directory" in caplog.text and "the run itself is unaffected" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("not json\n")
    assert plot.plot_run(empty) is None
    assert "no records" in caplog.text
    run = _write_run(tmp_path / "ok", _records(steps=3))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert plot.plot_run(run, blocker / "plots.png") is None  # cannot create a directory under a file
    # a cut-off last line (a killed run) is skipped, the rest is plotted
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 7.')
    assert plot.plot_run(run) == run / "plots.png"
    assert "skipped 1 unreadable line" in caplog.text


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    sweep = tmp_path / "sweep"
    _write_run(sweep / "a", _records(steps=2))
    run = _write_run(tmp_path / "run", _records(steps=2))
    assert plot.main([str(run), str(sweep)]) == 2
    assert "is a sweep directory: pass it alone" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Sweeps


def _config(lr, name="wsd", max_steps=10, out="x"):
    return {"model": {"num_hidden_layers": 2}, "optim": {"lr": lr, "betas": [0.9, 0.95]},
            "scheduler": {"name": name}, "trainer": {"max_steps": max_steps, "output_dir": f"outputs/{out}"}}


def _parse_summary(text: str) -> dict[str, dict]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| point")]
    out = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(["overrides", "train", "eval", "tokens", "wall", "status"], cells[1:]))
    return out


def test_sweep_summary_statuses_and_log_axis(tmp_path, capsys):
    sweep = tmp_path / "lr-sweep"
    points = {"p0": (1e-4, (5, 10)), "p1": (1e-3, (5,)), "p2": (1e-2, ())}  # finished, unfinished, failed
    for name, (lr, ckpts) in points.items():
        steps = 10 if name != "p1" else 7
        _write_run(sweep / name, _records(steps=steps, eval_every=5, seed=int(name[1])), _config(lr, out=name), ckpts)
    (sweep / "notes").mkdir()  # not a point: ignored

    assert plot.is_sweep_dir(sweep) and not plot.is_sweep_dir(sweep / "p0")
    assert plot.main([str(sweep)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(sweep / "curves.png"), str(sweep / "final_eval_loss.png"), str(sweep / "summary.md")]

    table = _parse_summary((sweep / "summary.md").read_text())
    assert set(table) == {"p0", "p1", "p2"}
    for name, (lr, _) in points.items():
        records = metrics(sweep / name)
        row = table[name]
        assert row["overrides"] == f"optim.lr={json.dumps(lr)}"  # only the swept key (output_dir is identity)
        assert float(row["train"]) == pytest.approx(records[-1]["loss"], abs=5e-5)
        last_eval = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
        assert float(row["eval"]) == pytest.approx(last_eval, abs=5e-5)
        assert int(row["tokens"]) == records[-1]["tokens"]
        wall = sum(512 / r["tokens_per_sec"] for r in records)  # each record covers one step of 512 tokens
        assert float(row["wall"].split()[0]) == pytest.approx(wall, abs=0.05)
    assert table["p0"]["status"] == "finished"
    assert table["p1"]["status"] == "unfinished (step 5)"
    assert table["p2"]["status"] == "failed"
    assert _png_size(sweep / "curves.png")[0] == 1200

    fig = plot.sweep_figure(plot.sweep_rows([plot.load_run(sweep / p) for p in points], ["optim.lr"]), ["optim.lr"])
    ax = fig.panels["optim.lr"]
    assert ax.get_xscale() == "log"  # 1e-4 .. 1e-2 spans 100x
    line = _line(ax, "optim.lr")
    assert list(line.get_xdata()) == [1e-4, 1e-3, 1e-2]
    assert list(line.get_ydata()) == pytest.approx([[r["eval_loss"] for r in metrics(sweep / p) if "eval_loss" in r][-1]
                                                    for p in points])


def test_sweep_of_two_keys_linear_and_categorical(tmp_path):
    sweep = tmp_path / "sweep"
    grid = [(1e-3, "wsd"), (2e-3, "wsd"), (4e-3, "cosine")]
    for i, (lr, name) in enumerate(grid):
        _write_run(sweep / f"p{i}", _records(steps=4, eval_every=2, seed=i), _config(lr, name, max_steps=4, out=i), (4,))
    runs = [plot.load_run(p) for p in plot.sweep_points(sweep)]
    keys = plot.swept_keys(runs)
    assert keys == ["optim.lr", "scheduler.name"]
    fig = plot.sweep_figure(plot.sweep_rows(runs, keys), keys)
    assert fig.panels["optim.lr"].get_xscale() == "linear"  # 4x: not worth a log axis
    assert [t.get_text() for t in fig.panels["scheduler.name"].get_xticklabels()] == ["cosine", "wsd"]
    assert list(_line(fig.panels["scheduler.name"], "scheduler.name").get_xdata()) == [0, 1, 1]  # p2, then p0, p1
    written = plot.plot_sweep(sweep, tmp_path / "report")
    assert "optim.lr=0.004, scheduler.name=cosine" in written["summary"].read_text()
    assert all(_png_size(written[k])[0] > 0 for k in ("curves", "final_eval_loss"))


def test_a_swept_config_group_is_one_key_named_by_the_points(tmp_path):
    """Points named as `python -m train --multirun model=a,b optim.lr=x,y` names them: the swept keys
    are `model` and `optim.lr` (not every model field in which the presets differ), with the names'
    values, numbers parsed as numbers."""
    sweep = tmp_path / "sweep"
    models = {"doge-tiny": {"model_type": "doge", "hidden_size": 64}, "glm4-tiny": {"model_type": "glm4", "head_dim": 16}}
    for i, (model, lr) in enumerate([("doge-tiny", 1e-3), ("doge-tiny", 3e-3), ("glm4-tiny", 1e-3)]):
        config = {**_config(lr, out=i), "model": models[model]}
        _write_run(sweep / f"model={model},optim.lr={lr}", _records(steps=4, eval_every=2, seed=i), config, (4,))
    runs = [plot.load_run(p) for p in plot.sweep_points(sweep)]
    assert plot.swept_keys(runs) == ["model", "optim.lr"]
    rows = plot.sweep_rows(runs, ["model", "optim.lr"])
    assert [r["overrides"] for r in rows] == [{"model": "doge-tiny", "optim.lr": 0.001},
                                             {"model": "doge-tiny", "optim.lr": 0.003},
                                             {"model": "glm4-tiny", "optim.lr": 0.001}]
    written = plot.plot_sweep(sweep)
    table = _parse_summary(written["summary"].read_text())
    assert table["model=glm4-tiny,optim.lr=0.001"]["overrides"] == "model=glm4-tiny, optim.lr=0.001"
    fig = plot.sweep_figure(rows, ["model", "optim.lr"])
    assert set(fig.panels) == {"model", "optim.lr"}
    assert list(_line(fig.panels["optim.lr"], "optim.lr").get_xdata()) == [0.001, 0.001, 0.003]
    # points not named by overrides (hand-made directories): the differing config keys, as before
    (sweep / "model=doge-tiny,optim.lr=0.001").rename(sweep / "first")
    runs = [plot.load_run(p) for p in plot.sweep_points(sweep)]
    assert plot.swept_keys(runs) == ["model.head_dim", "model.hidden_size", "model.model_type", "optim.lr"]


# ---------------------------------------------------------------------------------------------------
# The user's door: a real tiny MoE run, then the CLI


def test_cli_plots_a_real_tiny_moe_run(tmp_path, env):
    out = tmp_path / "moe-run"
    run_train([*FAST, "model=doge-tiny-moe", "trainer.max_steps=4", "trainer.eval_every=2",
               f"trainer.output_dir={out}", "trainer.plot=true"], env)
    records = metrics(out)
    _image_is_drawn(out / "plots.png", _png_size(out / "plots.png"))  # the run drew its own at the end
    assert [r["step"] for r in records if "expert_load" in r] == [2, 4]  # eval steps and the last step only
    for row in records[-1]["expert_load"]:
        assert len(row) == 64 and sum(row) == pytest.approx(1.0, abs=1e-4)

    png = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "-m", "train.plot", str(out), "-o", str(png)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(png)
    size = _png_size(png)
    assert size == (1200, round(3.2 * 5 * plot.DPI))  # loss, lr/grad, speed, MoE row, heatmap row
    _image_is_drawn(png, size)

    fig = plot.figure_for_runs([out])  # what the CLI drew, from the same records
    assert len(_line(fig.panels["loss vs tokens"], "moe-run:loss:tokens").get_xdata()) == len(records) == 4
    assert list(_line(fig.panels["aux loss"], "moe-run:aux_loss:step").get_ydata()) == [r["aux_loss"] for r in records]
    (image,) = fig.panels["expert load heatmap"].get_images()
    numpy.testing.assert_allclose(image.get_array(), [[s * 64 for s in row] for row in records[-1]["expert_load"]])


# ---------------------------------------------------------------------------------------------------
# The user's door: python -m train.plot on a sweep with numeric values, read as a user would


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_a_numeric_sweep_reads_in_value_order_and_nothing_covers_the_curves(tmp_path, env):
    """Points trainer.seed=5,10,15,20 of a 4-expert MoE: summary.md, the legend and the final-loss axis
    in value order (not 10, 15, 20, 5 as text), a title that does not list every point, no legend over
    the panels, whole experts on the heatmap's axis."""
    sweep = tmp_path / "seeds"
    for i, seed in enumerate([5, 10, 15, 20]):
        config = {"model": {"num_hidden_layers": 2}, "trainer": {"max_steps": 6, "seed": seed}}
        _write_run(sweep / f"trainer.seed={seed}", _records(steps=6, eval_every=3, moe=True, experts=4, routers=2,
                                                            seed=i, scale=1 + 0.05 * i), config, (6,))
    proc = subprocess.run([sys.executable, "-m", "train.plot", str(sweep)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = _parse_summary((sweep / "summary.md").read_text())
    assert list(table) == ["trainer.seed=5", "trainer.seed=10", "trainer.seed=15", "trainer.seed=20"]
    assert "4 points (4 finished)" in (sweep / "summary.md").read_text()
    for name in ("curves.png", "final_eval_loss.png"):
        _image_is_drawn(sweep / name, _png_size(sweep / name))

    # the figures the CLI drew, from the same directory
    runs = [plot.load_run(p) for p in plot.sweep_points(sweep)]
    rows = plot.sweep_rows(runs, ["trainer.seed"])
    labels, title = plot._labels(rows, ["trainer.seed"])
    fig = plot.figure_for_runs([r["run"] for r in rows], title="sweep seeds: 4 points", labels=labels,
                               legend_title=title)
    (legend,) = fig.legends
    assert legend.get_title().get_text() == "trainer.seed"
    assert [t.get_text() for t in legend.get_texts()][:4] == ["5", "10", "15", "20"]
    fig.canvas.draw()  # places the legend
    box = legend.get_window_extent()
    for name, ax in fig.panels.items():
        assert ax.get_legend() is None, name
        assert not _overlap(box, ax.get_window_extent()), name  # beside the panels, over no curve or marker
    heatmaps = [ax for name, ax in fig.panels.items() if name.startswith("expert load heatmap")]
    assert len(heatmaps) == 4
    for ax in heatmaps:
        ticks = [t for t in ax.get_xticks() if -0.5 <= t <= 3.5]
        assert ticks == [0, 1, 2, 3]  # one tick per expert, none at 0.5
    line = _line(plot.sweep_figure(rows, ["trainer.seed"]).panels["trainer.seed"], "trainer.seed")
    assert list(line.get_xdata()) == [5, 10, 15, 20]
