"""`make gpu-check` (`python -m train.gpu_check`) is for a GPU machine, but runs on a CPU too, so that it
does not rot: here in its reduced mode (one layout, 2 steps), through its command line."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import REPO

# the FAST data settings (tests/train/conftest.py), so the session's tokenizer cache is reused
DATA = ["data.seq_len=64", "data.tokenizer.train_bytes=1000000", "data.shuffle_buffer=16",
        "data.eval.holdout_documents=8"]


def test_gpu_check_runs_on_a_cpu_and_says_what_it_skipped(env):
    proc = subprocess.run([sys.executable, "-m", "train.gpu_check", "--quick", *DATA], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "gpu-check: no CUDA device: running on the CPU, in one process; what needs GPUs is skipped" in out
    assert "skipped: the other layouts and sizes" in out
    # bf16 against fp32 within the tolerance derived for doge-tiny's 2 layers: sqrt(6 * 2 + 1) * 2 * 2^-8
    bf16 = re.search(r"bf16 against fp32, steps 1-2: largest relative difference (\S+) .*tolerance (\S+): ok", out)
    assert bf16 and float(bf16.group(1)) <= float(bf16.group(2)) == float(f"{13 ** 0.5 * 2 / 256:.2e}"), out
    # the resumed step is the uninterrupted run's (on a CPU, in one process, bit for bit)
    assert re.search(r"resumed at step 1 against uninterrupted \(bf16\), steps 2-2: largest relative difference "
                     r"0\.00e\+00 .*: ok", out), out
    assert re.search(r"bf16: [\d,]+ tokens/s, MFU [\d.]+% of \S+ FLOP/s per device \(the rate of a bf16 matmul "
                     r"measured at start on this cpu\)", out), out
    assert re.search(r"bf16 peak memory: host rank 0 [\d.]+ GiB; device no CUDA device", out), out
    assert out.rstrip().endswith("gpu-check: 2 checks passed, 0 failed"), out


def test_a_loss_outside_the_tolerance_fails_the_check():
    from train.gpu_check import compare_losses, loss_tolerance

    tolerance = loss_tolerance(2)
    reference = {1: 7.0, 2: 6.9}
    assert compare_losses({1: 7.0, 2: 6.9 * (1 + tolerance / 2)}, reference, tolerance)[0]
    ok, text = compare_losses({1: 7.0, 2: 6.9 * (1 + 2 * tolerance)}, reference, tolerance)
    assert not ok and "step 2" in text
    assert not compare_losses({1: 7.0, 2: float("nan")}, reference, tolerance)[0]
    assert not compare_losses({3: 7.0}, reference, tolerance)[0]  # nothing compared is no pass
