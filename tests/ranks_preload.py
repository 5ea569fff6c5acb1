"""What the forkserver of tests/ranks.py imports once, before forking ranks: the heavy modules every
rank would otherwise import again (torch ~3 s, DeepSpeed ~3 s, datasets, the trainer), and those imported
on first use (each measured ~2 s per rank here): torch._dynamo (the first optimizer step and meta-device
init import it), torch._inductor (DeepSpeed's optimizer check imports its Muon module, which calls
torch.compile at import), datasets' streaming builders. None of them starts a thread or runs a torch op."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402,F401
import torch  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401

import data  # noqa: E402,F401
import models  # noqa: E402,F401
import train.checkpoint  # noqa: E402,F401
import train.engines.deepspeed_engine  # noqa: E402,F401
import train.engines.pipeline  # noqa: E402,F401
import train.engines.torch_engine  # noqa: E402,F401
import train.loop  # noqa: E402,F401
from data.sources import _configure_datasets, stdlib_files  # noqa: E402

try:  # what deepspeed.runtime.zero.utils.is_zero_supported_optimizer imports at each engine's start (0.19.8)
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: E402,F401
except ImportError:  # another DeepSpeed: its ranks import what they need themselves
    pass
_configure_datasets()  # imports datasets
import datasets.packaged_modules.generator.generator  # noqa: E402,F401

stdlib_files()  # listed once here, inherited by every forked rank
