"""Typed model configs that read and write transformers' config.json.

Each architecture declares a dataclass whose fields are, by default, the config.json keys that
transformers' own config class reads (same names, same defaults). Fields listed in `runtime_fields`
are our run-time choices (attention backend, ...) and are not written to config.json.

Two ways in, on purpose:
  * `from_dict` (presets, Hydra, Python): strict. An unknown key or a wrong type is an error that
    names the key and the valid choices.
  * `from_hf_dict` (a config.json written by transformers, by us, or published on the hub): lenient
    about bookkeeping keys transformers adds (architectures, dtype, ...), folds legacy RoPE keys
    (`rope_theta`, `rope_scaling`) into `rope_parameters` as transformers does.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import typing
from typing import Any, ClassVar


logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A model config that cannot be built; the message says which key and how to fix it."""


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (dict, typing.Dict):
        return isinstance(value, dict)
    if origin in (list, typing.List):
        return isinstance(value, (list, tuple))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) to plain Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


@dataclasses.dataclass
class ModelConfig:
    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""  # transformers' *ForCausalLM class name, for config.json
    runtime_fields: ClassVar[tuple[str, ...]] = ()
    # what a config's rope_parameters lacks is filled from here (transformers' defaults)
    rope_defaults: ClassVar[dict] = {"rope_type": "default", "rope_theta": 10000.0}
    # config.json keys transformers writes that carry no model maths
    hf_bookkeeping_keys: ClassVar[frozenset[str]] = frozenset(
        {
            "architectures", "auto_map", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
            "model_type", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
            "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "id2label",
            "label2id", "tokenizer_class", "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
            "add_cross_attention", "tie_encoder_decoder", "prefix", "sep_token_id", "decoder_start_token_id",
            "is_decoder", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss", "chunk_size",
        }
    )

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Any) -> "ModelConfig":
        values = dict(_plain(values))
        given_type = values.pop("model_type", cls.model_type)
        if given_type != cls.model_type:
            raise ConfigError(f"model_type {given_type!r} given to the {cls.model_type!r} config")
        known = set(cls.field_names())
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise ConfigError(
                    f"unknown key {key!r} in the {cls.model_type!r} model config.{hint} "
                    f"Valid keys: {sorted(known)}"
                )
        return cls(**values)

    @classmethod
    def from_hf_dict(cls, values: dict) -> "ModelConfig":
        values = dict(values)
        values.pop("model_type", None)
        rope = cls.fold_legacy_rope(values)
        known = set(cls.field_names())
        kept = {k: v for k, v in values.items() if k in known}
        ignored = sorted(set(values) - known - cls.hf_bookkeeping_keys - {"rope_parameters"})
        if ignored:
            logger.warning("config.json keys not used by the %s model: %s", cls.model_type, ignored)
        if rope is not None and "rope_parameters" in known:
            kept["rope_parameters"] = rope
        kept.update(cls.hf_defaults_for_missing(values))
        return cls(**kept)

    @classmethod
    def hf_defaults_for_missing(cls, values: dict) -> dict:
        """Values to use when a config.json lacks a key whose transformers default differs from ours."""
        return {}

    @staticmethod
    def fold_legacy_rope(values: dict) -> dict | None:
        """transformers' convert_rope_params_to_dict: `rope_scaling` becomes `rope_parameters`, and
        top-level `rope_theta` / `partial_rotary_factor` fill in what the dict lacks."""
        rope = values.pop("rope_scaling", None) or values.get("rope_parameters")
        theta = values.pop("rope_theta", None)
        partial = values.pop("partial_rotary_factor", None)
        if rope is None and theta is None and partial is None:
            return None
        rope = dict(rope or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", theta if theta is not None else 10000.0)
        if partial is not None:
            rope.setdefault("partial_rotary_factor", partial)
        return rope

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                raise ConfigError(
                    f"{self.model_type} config: {f.name}={value!r} has type {type(value).__name__}, "
                    f"expected {hints[f.name]}"
                )
            if hints[f.name] is float and isinstance(value, int):
                setattr(self, f.name, float(value))
        self._validate_shared()
        self.validate()

    def _validate_shared(self) -> None:
        """Checks every architecture needs: RoPE parameters, attention backend, activation."""
        from .attention import ATTENTION_BACKENDS
        from .layers import ACTIVATIONS, validate_rope_parameters

        if hasattr(self, "rope_parameters"):
            self.rope_parameters = {**self.rope_defaults, **(self.rope_parameters or {})}
            try:
                validate_rope_parameters(self.rope_parameters)
            except ValueError as exc:
                raise ConfigError(f"{self.model_type} config: {exc}") from None
        for name, choices in (
            ("attn_implementation", ATTENTION_BACKENDS), ("hidden_act", ACTIVATIONS), ("activation_function", ACTIVATIONS)
        ):
            if hasattr(self, name) and getattr(self, name) not in choices:
                raise ConfigError(
                    f"{self.model_type} config: {name}={getattr(self, name)!r}; choose one of {sorted(choices)}"
                )

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(f"{self.model_type} config: {message}")

    def validate(self) -> None:
        """Architecture-specific checks; raise ConfigError (see `require`) with the fix in the message."""

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.runtime_fields}
        out = {"architectures": [self.architecture], "model_type": self.model_type, **values}
        if dtype is not None:
            out["dtype"] = dtype
        return out

    def to_json_string(self, dtype: str | None = None) -> str:
        return json.dumps(self.to_hf_dict(dtype), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
