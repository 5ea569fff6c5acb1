# Two jobs, each doing its own setup on a fresh machine:
#   make quickstart   the main job
#   make test         the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: quickstart test test-fast bench gpu-check clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch alone and first, pinned: anything unpinned would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# A real (short) pretraining: tiny Doge, built-in offline corpus, about 2 minutes on 2 CPU cores.
quickstart: $(STAMP)
	$(PY) -m train

# pytest exits 5 when it collected nothing: that fails too (a suite that ran nothing proves nothing).
# Two pytest workers, a test file each (--dist loadfile keeps a file's module fixtures in one worker):
# most tests wait on subprocesses (torchrun, launchers, interpreter start-up), so one worker alone
# leaves a core idle; on 2 cores this took the suite from 37 to 28 minutes.
test: $(STAMP)
	@$(PY) -m pytest -q -n 2 --dist loadfile tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

# The fast tier: every model and every layout (layouts on in-process ranks, tests/ranks.py), no door test
# (no trainer or launcher started as a subprocess) and nothing marked slow. Run it often.
test-fast: $(STAMP)
	@$(PY) -m pytest -q -n 2 --dist loadfile -m "not door and not slow" tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; fi; \
	exit $$status

bench: $(STAMP)
	$(PY) -m train.bench_models
	$(PY) -m train.bench_models --compile --case doge-20m
	$(PY) -m train.bench_memory
	$(PY) -m train.bench_data
	$(PY) -m train.bench_parallel

# On a GPU machine, first: each engine in bf16 for a few steps, saved and resumed, losses against fp32,
# tokens/s, MFU and peak memory per rank (train/gpu_check.py). On a CPU it skips what needs GPUs.
gpu-check: $(STAMP)
	$(PY) -m train.gpu_check

clean-venv:
	rm -rf $(VENV)
