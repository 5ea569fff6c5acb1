"""Model zoo: native PyTorch causal LMs whose checkpoints are Hugging Face model directories.

    models.build(config)             a fresh model from a config (dict, DictConfig or config object)
    models.from_pretrained(path)     load a Hugging Face directory or hub id (ours or transformers')
    model.save_pretrained(path)      write config.json + model.safetensors
    model(input_ids, labels=None, attention_mask=None, position_ids=None) -> .logits, .loss, .aux_loss

Modules: layers (norm, RoPE, MLPs, init), attention (masks and kernels), moe (routing, dispatch,
router statistics), loss (the objective), base (the decoder-layer contract and CausalLM), one file
per architecture, checkpoint / configuration (Hugging Face I/O).
"""

from __future__ import annotations

import os

import torch

from .base import CausalLM, DecoderLayer, raise_wrong_type
from .checkpoint import CheckpointError, read_config_json, resolve_model_dir
from .configuration import ConfigError, ModelConfig, _plain
from .doge import DogeConfig, DogeForCausalLM
from .glm4 import Glm4Config, Glm4ForCausalLM
from .jetmoe import JetMoeConfig, JetMoeForCausalLM

# model_type (as in config.json) -> model class. The only place an architecture is registered.
ARCHITECTURES: dict[str, type[CausalLM]] = {
    DogeConfig.model_type: DogeForCausalLM,
    Glm4Config.model_type: Glm4ForCausalLM,
    JetMoeConfig.model_type: JetMoeForCausalLM,
}


def model_class(model_type: str) -> type[CausalLM]:
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"unknown model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def make_config(config) -> ModelConfig:
    """A config object from a dict / DictConfig with a `model_type` key, or a config object as is."""
    if isinstance(config, ModelConfig):
        return config
    values = dict(_plain(config))
    if "model_type" not in values:
        raise ConfigError(f"model config needs a model_type; supported: {sorted(ARCHITECTURES)}")
    return model_class(values["model_type"]).config_class.from_dict(values)


def build(config, device=None, dtype=None) -> CausalLM:
    """A freshly initialised model (transformers' init) on `device` in `dtype` (default fp32, CPU)."""
    config = make_config(config)
    return model_class(config.model_type).build(config, device=device, dtype=dtype)


def from_pretrained(name_or_path: str | os.PathLike, device=None, dtype=torch.float32, **overrides) -> CausalLM:
    """Load any supported Hugging Face model directory (or hub id); the class comes from config.json."""
    directory = resolve_model_dir(name_or_path)
    model_type = read_config_json(directory).get("model_type")
    if model_type not in ARCHITECTURES:
        raise_wrong_type(directory, model_type, ARCHITECTURES)
    return ARCHITECTURES[model_type].from_pretrained(directory, device=device, dtype=dtype, **overrides)


__all__ = [
    "ARCHITECTURES", "CausalLM", "CheckpointError", "DecoderLayer", "ConfigError", "DogeConfig", "DogeForCausalLM",
    "Glm4Config", "Glm4ForCausalLM", "JetMoeConfig", "JetMoeForCausalLM",
    "build", "from_pretrained", "make_config", "model_class",
]
