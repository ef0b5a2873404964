"""Configuration of Idefics2: plain dataclasses that read and write the published `config.json`.

The defaults are the idefics2-8b values, so `Idefics2Config()` describes the published architecture.
Keys this package does not use (``architectures``, ``id2label``, ...) are kept in ``extra`` and written
back unchanged, so a config survives a load/save round trip.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "config.json"
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

# Keys that belong to the transformers wrapper rather than to the architecture; dropped on read.
_RUNTIME_KEYS = {"transformers_version", "idefics2_version", "_attn_implementation", "_attn_implementation_internal"}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent with another one."""


def _check_positive(config_name: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{config_name}.{name} must be a positive integer, got {value!r}")


def _check_activation(config_name: str, name: str, value: str) -> None:
    if value not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"{config_name}.{name}={value!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}")


class _ConfigBase:
    """Shared dict conversion for the sub-configs: known fields become attributes, the rest stays in `extra`."""

    model_type: str = ""
    extra: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> _ConfigBase:
        data = dict(data or {})
        data.pop("model_type", None)  # hub files carry the remote-code value "idefics2"
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        known = {k: data.pop(k) for k in list(data) if k in names}
        extra = {k: v for k, v in data.items() if k not in _RUNTIME_KEYS}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["model_type"] = self.model_type
        return out


@dataclass
class Idefics2VisionConfig(_ConfigBase):
    """SigLIP-style vision tower (idefics2-8b: 1152 wide, 27 layers, 16 heads, patch 14, 980 px)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "idefics2_vision"

    def __post_init__(self) -> None:
        _check_positive(
            "vision_config",
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_channels=self.num_channels,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.num_attention_heads={self.num_attention_heads} does not divide "
                f"vision_config.hidden_size={self.hidden_size}"
            )
        if self.patch_size > self.image_size:
            raise ConfigError(
                f"vision_config.patch_size={self.patch_size} is larger than image_size={self.image_size}"
            )
        _check_activation("vision_config", "hidden_act", self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class Idefics2PerceiverConfig(_ConfigBase):
    """Perceiver resampler of the connector: `resampler_n_latents` latents per image, `resampler_depth` layers."""

    hidden_act: str = "silu"
    hidden_size: int = 4096
    rms_norm_eps: float = 1e-6
    resampler_n_latents: int = 64
    resampler_depth: int = 3
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    num_key_value_heads: int = 4
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "idefics2_perceiver"

    def __post_init__(self) -> None:
        _check_positive(
            "perceiver_config",
            hidden_size=self.hidden_size,
            resampler_n_latents=self.resampler_n_latents,
            resampler_depth=self.resampler_depth,
            resampler_n_heads=self.resampler_n_heads,
            resampler_head_dim=self.resampler_head_dim,
            num_key_value_heads=self.num_key_value_heads,
        )
        if self.num_key_value_heads > self.resampler_n_heads:
            raise ConfigError(
                f"perceiver_config.num_key_value_heads={self.num_key_value_heads} must be <= "
                f"resampler_n_heads={self.resampler_n_heads}"
            )
        if self.resampler_n_heads % self.num_key_value_heads:
            raise ConfigError(
                f"perceiver_config.num_key_value_heads={self.num_key_value_heads} does not divide "
                f"resampler_n_heads={self.resampler_n_heads}"
            )
        _check_activation("perceiver_config", "hidden_act", self.hidden_act)


@dataclass
class MistralTextConfig(_ConfigBase):
    """Mistral decoder (idefics2-8b: 32 layers, 4096 wide, GQA 32/8, sliding window 4096, vocab 32003)."""

    vocab_size: int = 32003
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    attention_dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "mistral"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MistralTextConfig:
        data = dict(data or {})
        model_type = data.get("model_type", "mistral")
        if model_type != "mistral":
            raise ConfigError(f"text_config.model_type={model_type!r} is not supported; only 'mistral' is")
        # transformers v5 writes RoPE settings as `rope_parameters`, v4 as a top-level `rope_theta`.
        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None)
        if rope:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(f"text_config RoPE type {rope_type!r} is not supported; only 'default' is")
            data.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        return super().from_dict(data)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # Written in the v5 layout; transformers 5 reads `rope_parameters`, and keeps `head_dim` explicit.
        out["rope_parameters"] = {"rope_theta": float(out.pop("rope_theta")), "rope_type": "default"}
        out["head_dim"] = self.head_dim
        return out

    def __post_init__(self) -> None:
        _check_positive(
            "text_config",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"text_config.num_attention_heads={self.num_attention_heads} does not divide "
                    f"text_config.hidden_size={self.hidden_size} (set head_dim explicitly otherwise)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive("text_config", head_dim=self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"text_config.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_key_value_heads > self.num_attention_heads:
            raise ConfigError(
                f"text_config.num_key_value_heads={self.num_key_value_heads} must be <= "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.sliding_window is not None:
            _check_positive("text_config", sliding_window=self.sliding_window)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"text_config.pad_token_id={self.pad_token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        _check_activation("text_config", "hidden_act", self.hidden_act)


@dataclass
class Idefics2Config:
    """The whole model: `vision_config` -> `perceiver_config` (connector) -> `text_config` (Mistral)."""

    vision_config: Idefics2VisionConfig = field(default_factory=Idefics2VisionConfig)
    perceiver_config: Idefics2PerceiverConfig = field(default_factory=Idefics2PerceiverConfig)
    text_config: MistralTextConfig = field(default_factory=MistralTextConfig)
    image_token_id: int = 32001
    use_cache: bool = True
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # Runtime choice, never serialised: "sdpa" (default), "eager" or "flash_attention_2".
    attn_implementation: str = field(default="sdpa", compare=False)

    model_type = "idefics2"

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict) or self.vision_config is None:
            self.vision_config = Idefics2VisionConfig.from_dict(self.vision_config)
        if isinstance(self.perceiver_config, dict) or self.perceiver_config is None:
            self.perceiver_config = Idefics2PerceiverConfig.from_dict(self.perceiver_config)
        if isinstance(self.text_config, dict) or self.text_config is None:
            self.text_config = MistralTextConfig.from_dict(self.text_config)
        # The reference copies the text width and eps into a perceiver left at other sizes (its defaults).
        if self.perceiver_config.hidden_size != self.text_config.hidden_size:
            self.perceiver_config.hidden_size = self.text_config.hidden_size
            self.perceiver_config.rms_norm_eps = self.text_config.rms_norm_eps
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ConfigError(
                f"image_token_id={self.image_token_id} is outside the text vocabulary "
                f"(text_config.vocab_size={self.text_config.vocab_size})"
            )
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"attn_implementation={self.attn_implementation!r} is unknown; "
                f"expected one of {ATTENTION_IMPLEMENTATIONS}"
            )

    @property
    def image_seq_len(self) -> int:
        return self.perceiver_config.resampler_n_latents

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    def get_text_config(self) -> MistralTextConfig:
        return self.text_config

    # ---- dict / file conversion ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> Idefics2Config:
        data = copy.deepcopy(dict(data))
        data.update(overrides)
        model_type = data.pop("model_type", "idefics2")
        if model_type != "idefics2":
            raise ConfigError(f"model_type={model_type!r} is not an Idefics2 config (expected 'idefics2')")
        kwargs: dict[str, Any] = {}
        for name in ("vision_config", "perceiver_config", "text_config", "image_token_id", "use_cache",
                     "tie_word_embeddings", "attn_implementation"):
            if name in data:
                kwargs[name] = data.pop(name)
        # Old configs keep the dtype as `torch_dtype`; v5 as `dtype`. Keep one spelling.
        if "torch_dtype" in data and "dtype" not in data:
            data["dtype"] = data.pop("torch_dtype")
        data.pop("torch_dtype", None)
        kwargs["extra"] = {k: v for k, v in data.items() if k not in _RUNTIME_KEYS}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.extra)
        out.setdefault("architectures", ["Idefics2ForConditionalGeneration"])
        out.update(
            model_type=self.model_type,
            image_token_id=self.image_token_id,
            use_cache=self.use_cache,
            tie_word_embeddings=self.tie_word_embeddings,
            vision_config=self.vision_config.to_dict(),
            perceiver_config=self.perceiver_config.to_dict(),
            text_config=self.text_config.to_dict(),
        )
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Idefics2Config:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Idefics2Config:
        """Read `config.json` from a checkpoint directory (or a hub id, resolved through huggingface_hub)."""
        from .checkpoint import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(path, allow_patterns=[CONFIG_NAME])
        config_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: {directory} is not an Idefics2 checkpoint directory")
        config = cls.from_json_file(config_path)
        for name, value in overrides.items():
            setattr(config, name, value)
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
