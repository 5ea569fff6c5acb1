"""Hugging Face directory I/O: round trips, config semantics, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

import models
from models import CheckpointError, ConfigError, DogeConfig

REPO = Path(__file__).resolve().parents[2]
TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, keep_window_size=8,
)


@pytest.fixture()
def saved(tmp_path) -> Path:
    model = models.build(DogeConfig(**TINY))
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _same_logits(a, b):
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        return torch.equal(a(ids).logits, b(ids).logits)


def test_round_trip_is_exact_and_keeps_the_config(tmp_path):
    original = models.build(DogeConfig(**TINY))
    original.save_pretrained(tmp_path / "m")
    loaded = models.from_pretrained(tmp_path / "m")
    assert loaded.state_dict().keys() == original.state_dict().keys()
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert _same_logits(original, loaded)
    assert loaded.config == original.config == DogeConfig(**TINY)


def test_dtype_choice_on_load(saved):
    model = models.from_pretrained(saved, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    # rotary frequencies stay fp32 in a bf16 model, as in transformers
    assert all(layer.rotary_emb.inv_freq.dtype == torch.float32 for layer in model.model.layers.values())
    model.save_pretrained(saved.parent / "bf16")
    assert json.loads((saved.parent / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert models.from_pretrained(saved.parent / "bf16", dtype=None).lm_head.weight.dtype == torch.bfloat16


def test_sharded_save_and_load(tmp_path):
    model = models.build(DogeConfig(**TINY))
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert _same_logits(model, models.from_pretrained(tmp_path))
    # saving unsharded into the same directory removes the stale shards
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_tied_embeddings_share_storage_and_stay_tied_after_load(tmp_path):
    model = models.build(DogeConfig(**TINY, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = models.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_router_layout_defaults():
    # ours: causal per-token routing
    assert DogeConfig(**TINY, is_moe=True, num_experts=16, num_experts_per_tok=2).router_layout == "per_token"
    # a config.json without the field is transformers' (or a published checkpoint's): its layout
    hf_json = {"model_type": "doge", **TINY, "is_moe": True, "num_experts": 16, "num_experts_per_tok": 2}
    assert DogeConfig.from_hf_dict(hf_json).router_layout == "transformers"
    assert DogeConfig.from_hf_dict({**hf_json, "router_layout": "per_token"}).router_layout == "per_token"


def test_exporting_per_token_moe_warns_and_records_the_layout(tmp_path):
    model = models.build(DogeConfig(**TINY, is_moe=True, num_experts=16, num_experts_per_tok=2))
    with pytest.warns(UserWarning, match="per_token"):
        model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["router_layout"] == "per_token"
    assert models.from_pretrained(tmp_path).config.router_layout == "per_token"


def test_legacy_rope_keys_are_folded_like_transformers():
    legacy = {
        "model_type": "doge", **TINY, "rope_theta": 500.0,
        "rope_scaling": {"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048},
    }
    config = DogeConfig.from_hf_dict(legacy)
    assert config.rope_parameters == {
        "rope_type": "dynamic", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 2048,
    }


@pytest.mark.filterwarnings("ignore:exporting a Doge MoE")
@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml")))
def test_presets_build_and_match_transformers_shapes(preset):
    """Every preset builds (on the meta device: no memory for the big ones), and transformers builds
    the same parameter names and shapes from the config.json we would write."""
    transformers = pytest.importorskip("transformers")
    values = yaml.safe_load((REPO / "configs" / "model" / f"{preset}.yaml").read_text())
    model = models.build(values, device="meta")
    hf_values = model.config.to_hf_dict()
    model_type = hf_values.pop("model_type")
    hf_values.pop("architectures")
    hf_config = transformers.CONFIG_MAPPING[model_type](**hf_values)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs


def test_published_sizes():
    def params(name):
        values = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
        return models.build(values, device="meta").num_parameters() / 1e6

    # SmallDoge's model cards: Doge-20M is 13M parameters, 60M 54M, 160M 153M, 320M 336M.
    assert 12.5 < params("doge-20m") < 13.5
    assert 54 < params("doge-60m") < 55
    assert 152 < params("doge-160m") < 154
    assert 335 < params("doge-320m") < 337


# --------------------------------------------------------------------------------------- bad input


def test_unknown_config_key_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"unknown key 'hiden_size'.*Did you mean \['hidden_size'"):
        models.build({"model_type": "doge", "hiden_size": 32})
    with pytest.raises(ConfigError, match="unknown model_type 'gpt9'"):
        models.build({"model_type": "gpt9"})
    with pytest.raises(ConfigError, match="hidden_size='big' has type str"):
        models.build({"model_type": "doge", "hidden_size": "big"})


def test_bad_moe_config_is_refused():
    with pytest.raises(ConfigError, match="perfect square"):
        DogeConfig(**TINY, is_moe=True, num_experts=15)
    with pytest.raises(ConfigError, match="num_experts_per_tok=17"):
        DogeConfig(**TINY, is_moe=True, num_experts=16, num_experts_per_tok=17)
    with pytest.raises(ConfigError, match="rope_type"):
        DogeConfig(**TINY, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4})  # no factor


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        models.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        models.from_pretrained(tmp_path)


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing"):
        models.from_pretrained(saved)


def test_pickle_weights_are_refused_not_loaded(saved):
    (saved / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="Pickle files are never loaded"):
        models.from_pretrained(saved)


def test_unknown_model_type(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'llama' is not supported"):
        models.from_pretrained(saved)


def test_corrupt_config_json(saved):
    (saved / "config.json").write_text('{"model_type": "doge", ')
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        models.from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(saved, damage):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        models.from_pretrained(saved)


def test_wrong_shapes(saved):
    config = json.loads((saved / "config.json").read_text())
    config["intermediate_size"] = 64
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"wrong shape.*mlp.gate_proj.weight: file \(48, 32\) vs config \(64, 32\)"):
        models.from_pretrained(saved)


def test_missing_and_unexpected_tensors(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(saved / "model.safetensors")
    state.pop("model.layers.1.self_attn.A")
    state["model.layers.9.extra"] = torch.zeros(1)
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: \['model.layers.1.self_attn.A'\].*does not use: \['model.layers.9.extra'\]"):
        models.from_pretrained(saved)


def test_dense_checkpoint_with_moe_config_says_what_is_missing(saved):
    config = json.loads((saved / "config.json").read_text())
    config.update(is_moe=True, num_experts=16, num_experts_per_tok=2)
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="router_gate"):
        models.from_pretrained(saved)


# --------------------------------------------------------------------------------------- hub paths


def test_hub_id_offline_fails_fast_with_a_clear_message():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"SmallDoge/Doge-20M: not a local directory.*Offline\?"):
        models.from_pretrained("SmallDoge/Doge-20M")
    assert time.monotonic() - start < 5


def test_hub_id_resolves_from_the_local_hub_cache(saved):
    """The real hub code path (huggingface_hub.snapshot_download), against a cache laid out as the
    hub client lays it out."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo = cache / "models--test-org--doge-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    try:
        model = models.from_pretrained("test-org/doge-tiny")
        assert _same_logits(model, models.from_pretrained(saved))
    finally:
        shutil.rmtree(repo)
