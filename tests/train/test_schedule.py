"""Learning-rate schedules against values computed by hand (peak 1.0 so lr = factor)."""

import math

import pytest

from train.config import SchedulerSchema
from train.schedule import build_schedule


def lrs(schedule, steps):
    return [schedule(s) for s in steps]


def test_wsd_linear_by_hand():
    # 100 steps, 10 warmup, 20 decay: warmup steps 0-9, stable 10-79, decay 80-99
    s = build_schedule(SchedulerSchema(warmup=10, decay=20), peak_lr=1.0, total_steps=100)
    assert lrs(s, [0, 4, 9]) == pytest.approx([0.1, 0.5, 1.0])
    assert lrs(s, [10, 50, 79]) == [1.0, 1.0, 1.0]
    # decay: p = (s - 80 + 1) / 20 -> 1 - p
    assert lrs(s, [80, 89, 99]) == pytest.approx([0.95, 0.5, 0.0])


def test_wsd_fractions_min_lr_and_decay_shapes():
    cfg = SchedulerSchema(warmup=0.1, decay=0.1, min_lr_ratio=0.1, decay_type="cosine")
    s = build_schedule(cfg, peak_lr=2.0, total_steps=200)  # 20 warmup, decay over steps 180-199
    assert s.warmup_steps == 20 and s.decay_start == 180
    # step 189: p = 10/20 = 0.5 -> 0.1 + 0.9 * (1 + cos(pi/2)) / 2 = 0.55
    assert s(189) == pytest.approx(2.0 * 0.55)
    assert s(199) == pytest.approx(2.0 * 0.1)
    sqrt = build_schedule(SchedulerSchema(warmup=0, decay=4, decay_type="1-sqrt"), 1.0, 10)
    # decay over steps 6-9: p = 1/4, 2/4, 3/4, 1 -> 1 - sqrt(p)
    assert lrs(sqrt, [6, 7, 8, 9]) == pytest.approx([0.5, 1 - math.sqrt(0.5), 1 - math.sqrt(0.75), 0.0])


def test_cosine_warmup():
    s = build_schedule(SchedulerSchema(warmup=4, warmup_type="cosine"), 1.0, 100)
    # (1 - cos(pi * (s+1)/4)) / 2
    assert lrs(s, [0, 1, 3]) == pytest.approx([(1 - math.cos(math.pi / 4)) / 2, 0.5, 1.0])


def test_plain_cosine_and_constant():
    c = build_schedule(SchedulerSchema(name="cosine", warmup=10, min_lr_ratio=0.0), 1.0, 110)
    # after 10 warmup steps, cosine over 100 steps: step 59 -> p = 50/100 -> 0.5
    assert c(59) == pytest.approx(0.5) and c(109) == pytest.approx(0.0) and c(9) == pytest.approx(1.0)
    k = build_schedule(SchedulerSchema(name="constant", warmup=2), 1.0, 50)
    assert lrs(k, [0, 1, 2, 49]) == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_decay_branch_starts_at_the_checkpoint():
    cfg = SchedulerSchema(warmup=10, decay=0.1, branch_decay_steps=20)
    main = build_schedule(cfg, 1.0, 1000)
    branch = build_schedule(cfg, 1.0, 1000, branch_from=300)
    assert main(300) == 1.0 and branch.total_steps == 320 and branch.decay_start == 300
    # decay over steps 300-319: step 309 -> p = 10/20
    assert branch(309) == pytest.approx(0.5) and branch(319) == pytest.approx(0.0)
    assert "decay over steps 300-319" in branch.describe()
    with pytest.raises(ValueError, match="after warmup"):
        build_schedule(cfg, 1.0, 1000, branch_from=5)


def test_bad_schedules():
    with pytest.raises(ValueError, match="longer than the run"):
        build_schedule(SchedulerSchema(warmup=60, decay=60), 1.0, 100)


@pytest.mark.parametrize("cfg,steps,line", [
    (SchedulerSchema(warmup=0.1, decay=0.1), 1, "wsd: peak lr 1; no warmup; stable step 0; no decay; 1 step"),
    (SchedulerSchema(warmup=1, decay=1), 2,
     "wsd: peak lr 1; linear warmup over step 0; no stable; linear decay over step 1 to 0 x peak; 2 steps"),
    (SchedulerSchema(warmup=2, decay=3), 10, "wsd: peak lr 1; linear warmup over steps 0-1; stable steps 2-6; "
                                            "linear decay over steps 7-9 to 0 x peak; 10 steps"),
    (SchedulerSchema(name="cosine", warmup=0), 1, "cosine: peak lr 1; no warmup; cosine decay over step 0 to 0 x peak; "
                                                 "1 step"),
    (SchedulerSchema(name="constant", warmup=0), 3, "constant: peak lr 1; no warmup; then constant; 3 steps"),
])
def test_the_schedule_line_of_short_runs_reads_sensibly(cfg, steps, line):
    assert build_schedule(cfg, 1.0, steps).describe() == line
