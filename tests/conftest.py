"""Test-wide settings: offline hub, quiet threads, private HF cache. Set before any test imports
transformers / datasets / huggingface_hub, which read these at import time."""

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_MODE"] = "disabled"

# One inductor cache for the session, shared by both pytest workers and every run they start (the trainer
# keeps a TORCHINDUCTOR_CACHE_DIR it is given): a layer graph compiled by one test is a cache hit for the
# next one with the same graph, instead of minutes of C++ compilation per test on a cold cache. Tests that
# check compilation count dynamo's graphs, which dynamo traces whether or not inductor's cache hits.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one pytest run
os.environ["TORCHINDUCTOR_CACHE_DIR"] = (os.path.join(tempfile.gettempdir(), f"smolpretrain-tests-inductor-{_RUN_ID}")
                                         if _RUN_ID else tempfile.mkdtemp(prefix="smolpretrain-tests-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Tiers (Makefile): `make test-fast` runs neither `door` nor `slow` tests; `make test` runs everything.
# A door test runs the trainer or a launcher as a user does, in a subprocess (`python -m train`,
# torchrun, launch/*.sh, `python -m train.plot` ...): every test that takes one of these fixtures,
# which are the subprocess environment and the module fixtures that start such runs.
DOOR_FIXTURES = {"env", "moe_runs", "ep_runs", "fake_slurm", "plan_env"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DOOR_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.door)
