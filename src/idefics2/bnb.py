"""bitsandbytes 4-bit / 8-bit loading, as in the seed's "shrinking down Idefics2" section.

`BitsAndBytesConfig` has transformers' fields and dict form (ours, so transformers stays out of the runtime).
Quantization is applied to a loaded model as a transform: every `nn.Linear` outside the skip list becomes a
bitsandbytes `Linear4bit` / `Linear8bitLt`, quantized from the float weight by bitsandbytes itself (so the
result equals what transformers produces for the same modules). By default the vision tower, the connector
and `lm_head` stay in floating point, as TGI and the published AWQ checkpoints do; `llm_int8_skip_modules`
replaces that list. Checkpoints saved quantized (by us or by transformers) load back prequantized.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEFAULT_SKIP_MODULES = ["vision_model", "connector", "lm_head"]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8}


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r} in BitsAndBytesConfig")
    return _DTYPES[name]


@dataclass
class BitsAndBytesConfig:
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: Any = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: Any = None

    quant_method = "bitsandbytes"

    def __post_init__(self) -> None:
        if self.load_in_4bit == self.load_in_8bit:
            raise ValueError("BitsAndBytesConfig needs exactly one of load_in_4bit=True or load_in_8bit=True")
        if self.bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'fp4' or 'nf4', got {self.bnb_4bit_quant_type!r}")
        self.bnb_4bit_compute_dtype = _dtype(self.bnb_4bit_compute_dtype) or torch.float32
        self.bnb_4bit_quant_storage = _dtype(self.bnb_4bit_quant_storage) or torch.uint8

    @property
    def skip_modules(self) -> list[str]:
        return list(self.llm_int8_skip_modules) if self.llm_int8_skip_modules is not None else DEFAULT_SKIP_MODULES

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["bnb_4bit_compute_dtype"] = str(self.bnb_4bit_compute_dtype).removeprefix("torch.")
        out["bnb_4bit_quant_storage"] = str(self.bnb_4bit_quant_storage).removeprefix("torch.")
        out["llm_int8_skip_modules"] = self.skip_modules
        out.update(quant_method="bitsandbytes", _load_in_4bit=self.load_in_4bit, _load_in_8bit=self.load_in_8bit)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitsAndBytesConfig:
        data = dict(data)
        data.setdefault("load_in_4bit", data.get("_load_in_4bit", False))
        data.setdefault("load_in_8bit", data.get("_load_in_8bit", False))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def coerce(cls, value: Any) -> BitsAndBytesConfig:
        """Ours, a dict, or an object with the same fields (e.g. transformers' BitsAndBytesConfig)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if hasattr(value, "to_dict") and getattr(value, "quant_method", None) in ("bitsandbytes", "BITS_AND_BYTES"):
            return cls.from_dict(json.loads(json.dumps(value.to_dict(), default=str)))
        raise NotImplementedError(
            f"quantization_config of type {type(value).__name__} is not supported; use idefics2.BitsAndBytesConfig "
            "or quantize='int8'|'int4'"
        )


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("quantization_config=BitsAndBytesConfig(...) needs bitsandbytes: pip install bitsandbytes"
                          ) from e
    return bitsandbytes


def target_linears(model: nn.Module, config: BitsAndBytesConfig) -> list[str]:
    skip = config.skip_modules
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(s in name.split(".") or name.startswith(s) for s in skip)]


def _bnb_module(linear_in: int, linear_out: int, bias: bool, config: BitsAndBytesConfig):
    bnb = _import_bnb()
    if config.load_in_4bit:
        return bnb.nn.Linear4bit(linear_in, linear_out, bias=bias, compute_dtype=config.bnb_4bit_compute_dtype,
                                 compress_statistics=config.bnb_4bit_use_double_quant,
                                 quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage)
    return bnb.nn.Linear8bitLt(linear_in, linear_out, bias=bias, has_fp16_weights=config.llm_int8_has_fp16_weight,
                               threshold=config.llm_int8_threshold)


def quantize_with_bnb(model: nn.Module, config: BitsAndBytesConfig, device: torch.device) -> None:
    """Replace the target Linear layers with bitsandbytes layers quantized from their float weights."""
    bnb = _import_bnb()
    for name in target_linears(model, config):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        module = _bnb_module(linear.in_features, linear.out_features, linear.bias is not None, config)
        weight = linear.weight.data.contiguous()
        if config.load_in_4bit:
            module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=config.bnb_4bit_quant_type,
                                              compress_statistics=config.bnb_4bit_use_double_quant,
                                              quant_storage=config.bnb_4bit_quant_storage, module=module)
        else:
            module.weight = bnb.nn.Int8Params(weight, requires_grad=False,
                                              has_fp16_weights=config.llm_int8_has_fp16_weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, child, module.to(device))  # bitsandbytes quantizes on the move to the device
    model.config.extra["quantization_config"] = config.to_dict()


def prequantized_names(state: dict[str, torch.Tensor]) -> set[str]:
    """Linear modules whose quantized weight and statistics are in a loaded state dict."""
    names = set()
    for key in state:
        for marker in (".weight.absmax", ".SCB"):
            if key.endswith(marker):
                names.add(key[: -len(marker)])
    return names


def load_prequantized(model: nn.Module, state: dict[str, torch.Tensor], names: set[str],
                      config: BitsAndBytesConfig, device: torch.device) -> None:
    """Put bitsandbytes layers rebuilt from saved weights + statistics at `names` (popping their tensors)."""
    bnb = _import_bnb()
    for name in sorted(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        module = _bnb_module(linear.in_features, linear.out_features, False, config)
        prefix = name + "."
        own = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        if config.load_in_4bit:
            stats = {k[len("weight."):]: v for k, v in own.items() if k.startswith("weight.")}
            module.weight = bnb.nn.Params4bit.from_prequantized(own["weight"].clone(), stats, requires_grad=False,
                                                                device=device, module=module)
            module = module.to(device)
        else:
            # bitsandbytes loads int8 state only into an already-quantized layer: quantize the placeholder
            # weights first, then overwrite them with the saved ones.
            module = module.to(device)
            module.load_state_dict({k: v.clone() for k, v in own.items()})
        setattr(parent, child, module)
    model.config.extra["quantization_config"] = config.to_dict()
