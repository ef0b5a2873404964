"""Weight-only int8 / int4 quantization of the text decoder, on torch's own CPU kernels.

Decoding on a CPU is bound by the bytes of weights streamed per token, so smaller weights decode faster:
int8 per output channel (`aten._weight_int8pack_mm`) and int4 in groups of 32/64/128 along the input
(`aten._weight_int4pack_mm_for_cpu`), both with bf16 activations. Quantization is a model-to-model transform
(`quantize_model`), applied at load time from a float checkpoint layer by layer, so the float model is never
held in memory at once. On disk the tensors are device-neutral (int8 matrix + scales; int4 as two nibbles a
byte + scales and zero points) and are packed for the running device when loaded.
The vision tower, the connector and `lm_head` stay in floating point.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("int8", "int4")
DEFAULT_TARGETS = r"model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"


class QuantizedLinear(nn.Module):
    """A bias-free Linear whose weight is int8 (per output channel) or int4 (per group), computed in bf16."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 64) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4 and in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            groups = in_features // group_size
            self.register_buffer("scales", torch.ones(groups, out_features, dtype=torch.bfloat16))
            self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.bfloat16))
        self._packed: torch.Tensor | None = None
        self._scales_and_zeros: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 64) -> QuantizedLinear:
        if linear.bias is not None:
            raise ValueError("only bias-free linear layers are quantized")
        module = cls(linear.in_features, linear.out_features, bits, group_size)
        weight = linear.weight.detach().float()
        if bits == 8:
            scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
            module.qweight = torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8)
            module.scales = scale.to(torch.bfloat16)
        else:
            grouped = weight.reshape(linear.out_features, -1, group_size)
            low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
            scale = ((high - low) / 15).clamp(min=1e-8)
            q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
            q = q.reshape(linear.out_features, -1)
            module.qweight = q[:, 0::2] | (q[:, 1::2] << 4)
            module.scales = scale.t().contiguous().to(torch.bfloat16)
            # The kernel computes (q - 8) * scale + zero, so the stored zero is the value at q = 8.
            module.zeros = (low + 8 * scale).t().contiguous().to(torch.bfloat16)
        return module

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scales.float()[:, None]
        q = self.unpacked_nibbles().float().reshape(self.out_features, -1, self.group_size)
        scale = self.scales.float().t()[..., None]
        zero = self.zeros.float().t()[..., None]
        return ((q - 8) * scale + zero).reshape(self.out_features, self.in_features)

    def unpacked_nibbles(self) -> torch.Tensor:
        q = torch.empty(self.out_features, self.in_features, dtype=torch.uint8, device=self.qweight.device)
        q[:, 0::2] = self.qweight & 0x0F
        q[:, 1::2] = self.qweight >> 4
        return q

    def _pack_int4(self) -> None:
        # The packed layout is device- and version-specific, so it is derived here and never saved.
        q = self.unpacked_nibbles().to(torch.int32)
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self._scales_and_zeros = torch.stack([self.scales, self.zeros], dim=-1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            # No packed CUDA path yet: dequantize (correct, not fast).
            return F.linear(x, self.dequantize().to(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            if self._packed is None:
                self._pack_int4()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._packed, self.group_size,
                                                         self._scales_and_zeros)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def quantize_model(model: nn.Module, method: str, group_size: int = 64, targets: str = DEFAULT_TARGETS) -> nn.Module:
    """Replace the matching Linear layers of `model` in place, one at a time (their float weight is freed)."""
    if method not in METHODS:
        raise ValueError(f"quantize={method!r} is not supported; choose one of {METHODS}")
    bits = 8 if method == "int8" else 4
    pattern = re.compile(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not names:
        raise ValueError(f"no linear layer matches {targets!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantizedLinear.from_linear(getattr(parent, child), bits, group_size))
    model.config.extra["quantization_config"] = quantization_config(method, group_size, targets)
    return model


def quantization_config(method: str, group_size: int, targets: str) -> dict:
    return {"quant_method": "idefics2", "method": method, "group_size": group_size, "targets": targets}


def prepare_quantized_skeleton(model: nn.Module, config: dict) -> None:
    """Before loading a quantized checkpoint: put empty QuantizedLinear modules where it has them."""
    bits = 8 if config["method"] == "int8" else 4
    pattern = re.compile(config.get("targets", DEFAULT_TARGETS))
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and pattern.search(name):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    QuantizedLinear(module.in_features, module.out_features, bits, config.get("group_size", 64)))
