"""What the forkserver of tests/ranks.py imports once, before forking ranks: the heavy modules every
rank would otherwise import again (torch ~3 s, DeepSpeed ~3 s, datasets, the trainer)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402,F401
import torch  # noqa: E402,F401

import data  # noqa: E402,F401
import models  # noqa: E402,F401
import train.checkpoint  # noqa: E402,F401
import train.engines.deepspeed_engine  # noqa: E402,F401
import train.engines.pipeline  # noqa: E402,F401
import train.engines.torch_engine  # noqa: E402,F401
import train.loop  # noqa: E402,F401
from data.sources import stdlib_files  # noqa: E402

stdlib_files()  # listed once here, inherited by every forked rank
