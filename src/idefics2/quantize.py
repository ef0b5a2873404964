"""Weight-only int8 / int4 quantization of the text decoder for fast CPU decoding.

Decoding on a CPU is bound by the bytes of weights streamed per token, so smaller weights decode faster:
int8 per output channel and int4 in groups of 32/64/128 along the input. Decoding (<= 16 rows) runs on
idefics2's streaming kernels (`idefics2.kernels`: int8 through AVX512-VNNI with int16 activations; int4 through
AVX512-VNNI with activations rounded to int8 per group); prefill dequantizes a block of rows at a time for fp32
GEMM; CPUs without the kernels use torch's `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu`
(bf16 activations). Quantization is a model-to-model transform (`quantize_model`), applied at load time from a
float checkpoint layer by layer, so the float model is never held in memory at once. On disk the tensors are
plain integer and bf16 arrays any device can unpack (int8 matrix + scales; int4 as two nibbles a byte in
idefics2's x16 order + scales and zero points, see `pack_int4`) and are used as stored by idefics2's kernels
(torch's packed int4 layout is derived on first use only where the kernels are unavailable).
`lm_head` is quantized with the layers' method by default (`quantize_lm_head="int8"` keeps it in int8 under
int4, as llama.cpp keeps its output matrix at higher precision; False keeps it in float): at decode it is the
largest single matrix streamed per token (32k x 4096 on idefics2-8b), and in bf16 it alone would cap int4
decoding well below 3x bf16 on a model like the `medium` preset (int4 like MLX's 4-bit conversions; its int4
rows are padded to a whole block of 16, the vocabulary being 32003). The vision tower, the connector and the
embeddings stay in floating point.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

METHODS = ("int8", "int4")
DEFAULT_TARGETS = r"model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"


INT4_LAYOUT = "x16"
INT4_BLOCK = 16  # output rows interleaved per block in the x16 layout
BITS = {"int8": 8, "int4": 4}


def int4_rows(out_features: int) -> int:
    """Rows an int4 weight stores: out_features rounded up to a whole x16 block (the padding rows are zero)."""
    return -(-out_features // INT4_BLOCK) * INT4_BLOCK


class QuantizedLinear(nn.Module):
    """A bias-free Linear whose weight is int8 (per output channel) or int4 (per group), computed in bf16.

    int8: `qweight` [N, K] int8 and `scales` [N]; w = q * scale.
    int4: `qweight` [N / 16, 8 K] uint8 in the x16 layout (`pack_int4`: 16 rows interleaved, so that one 64-byte
    load gives 16 rows x 8 consecutive elements), `scales` and `zeros` [N / 16, K / group, 16] (`interleave_rows`);
    w = (q - 8) * scale + zero.
    Up to 16 rows (decoding) run on idefics2's streaming kernels; more rows (prefill) dequantize a block of rows
    at a time to fp32 for the GEMM library; where the kernels cannot be built (or, for int4 decoding, the CPU
    lacks AVX512-VNNI) torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` are used.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 64) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4 and (group_size not in (32, 64, 128) or in_features % group_size):
            raise ValueError(f"int4 needs group_size 32, 64 or 128 and in_features divisible by it; got "
                             f"in_features={in_features}, group_size={group_size}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16))
        else:
            # whole blocks of 16 rows (the vocabulary of lm_head is 32003): the padding rows' outputs are dropped
            blocks, groups = int4_rows(out_features) // INT4_BLOCK, in_features // group_size
            self.register_buffer("qweight", torch.zeros(blocks, 8 * in_features, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(blocks, groups, INT4_BLOCK, dtype=torch.bfloat16))
            self.register_buffer("zeros", torch.zeros(blocks, groups, INT4_BLOCK, dtype=torch.bfloat16))
        # derived lazily, never saved: fp32 scales for the int8 kernel, torch's packed int4 layout
        self._scales_fp32: torch.Tensor | None = None
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
            weight = F.pad(weight, (0, 0, 0, module.padded_rows - linear.out_features))
            grouped = weight.reshape(module.padded_rows, -1, group_size)
            low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
            scale = ((high - low) / 15).clamp(min=1e-8)
            q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
            module.qweight = pack_int4(q.reshape(module.padded_rows, -1))
            module.scales = interleave_rows(scale.to(torch.bfloat16))
            # w = (q - 8) * scale + zero, so the stored zero is the value at q = 8.
            module.zeros = interleave_rows((low + 8 * scale).to(torch.bfloat16))
        return module

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scales.float()[:, None]
        q = unpack_int4(self.qweight).float().reshape(self.padded_rows, -1, self.group_size)
        scales, zeros = deinterleave_rows(self.scales).float(), deinterleave_rows(self.zeros).float()
        w = (q - 8) * scales[..., None] + zeros[..., None]
        return w.reshape(self.padded_rows, self.in_features)[: self.out_features]

    @property
    def padded_rows(self) -> int:
        """Rows as stored: out_features, rounded up to a whole block of 16 for int4."""
        return self.out_features if self.bits == 8 else int4_rows(self.out_features)

    def _torch_int4_pack(self) -> None:
        q = unpack_int4(self.qweight).to(torch.int32)
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales, zeros = deinterleave_rows(self.scales), deinterleave_rows(self.zeros)
        self._scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            # No packed GPU path yet: dequantize (correct, not fast), and say so once.
            warnings.warn(f"idefics2's int8/int4 layers have no {x.device.type} kernel yet: each call dequantizes "
                          "its weight (correct, but slower than bf16); on GPUs use "
                          "quantization_config=BitsAndBytesConfig(...)", RuntimeWarning, stacklevel=2)
            return F.linear(x, self.dequantize().to(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self._decode_kernel(x2)  # up to 16 rows
        if y is None:
            many_rows = x2.shape[0] > kernels.MAX_ROWS
            y = self._matmul_by_blocks(x2) if many_rows and kernels.kernel_available() else self._torch_op(x2)
        return y[:, : self.out_features].reshape(*shape[:-1], self.out_features).to(x.dtype)

    @staticmethod
    def parallel_forward(x: torch.Tensor, layers: tuple[QuantizedLinear, ...]) -> list[torch.Tensor] | None:
        """int8 or int4 layers of the same in_features at decode time in one kernel call (q/k/v, gate/up), or
        None (the caller runs them one by one)."""
        bits, group = layers[0].bits, layers[0].group_size
        if x.device.type != "cpu" or any(m.bits != bits or m.in_features != x.shape[-1] for m in layers):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        if bits == 8:
            ys = kernels.int8_matmuls(x2, [m.qweight for m in layers], [m._fp32_scales() for m in layers])
        elif all(m.group_size == group for m in layers):
            ys = kernels.int4_matmuls(x2, [m.qweight for m in layers], [m.scales for m in layers],
                                      [m.zeros for m in layers], group)
        else:
            return None
        if ys is None:
            return None
        return [y[:, : m.out_features].reshape(*x.shape[:-1], m.out_features).to(x.dtype) for y, m in zip(ys, layers)]

    def _decode_kernel(self, x2: torch.Tensor) -> torch.Tensor | None:
        if self.bits == 8:
            return kernels.int8_matmul(x2, self.qweight, self._fp32_scales())
        return kernels.int4_matmul(x2, self.qweight, self.scales, self.zeros, self.group_size)

    def _fp32_scales(self) -> torch.Tensor:
        if self._scales_fp32 is None:
            self._scales_fp32 = self.scales.float()
        return self._scales_fp32

    def _matmul_by_blocks(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill): fp32 weights a block of rows at a time (<= 32 MiB), through the GEMM library."""
        xf = x2.float()
        out = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        block = max(256, (8 << 20) // self.in_features) // INT4_BLOCK * INT4_BLOCK
        for n0 in range(0, self.out_features, block):
            rows = slice(n0, min(self.out_features, n0 + block))
            if self.bits == 8:
                weight = kernels.dequantize_int8(self.qweight[rows], self._fp32_scales()[rows])
            else:
                blocks = slice(rows.start // INT4_BLOCK, -(-rows.stop // INT4_BLOCK))
                weight = kernels.dequantize_int4(self.qweight[blocks], self.scales[blocks], self.zeros[blocks],
                                                 self.group_size)[: rows.stop - rows.start]
            out[:, rows] = xf @ weight.t()
        return out

    def _torch_op(self, x2: torch.Tensor) -> torch.Tensor:
        """Where idefics2's kernels cannot be built: torch's own weight-only ops (bf16 activations)."""
        xb = x2.to(torch.bfloat16).contiguous()
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.scales)
        if self._packed is None:
            self._torch_int4_pack()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self._packed, self.group_size, self._scales_and_zeros)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N / 16, 8 K] bytes in the x16 layout (N divisible by 16, K by 8).

    Rows go in blocks of 16; a block is K / 8 steps of 64 bytes, and byte 4r + t of step s holds element
    8s + t of the block's row r in its low nibble and element 8s + 4 + t in its high nibble: the operand order
    of AVX512-VNNI's byte dot product (4 consecutive elements of 16 rows per 64 bytes)."""
    n, k = q.shape
    steps = q.to(torch.uint8).reshape(n // INT4_BLOCK, INT4_BLOCK, k // 8, 2, 4)  # [block, r, step, half, t]
    packed = steps[:, :, :, 0] | (steps[:, :, :, 1] << 4)  # [block, r, step, t]
    return packed.permute(0, 2, 1, 3).reshape(n // INT4_BLOCK, 8 * k)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [N / 16, 8 K] bytes -> [N, K] uint8 values 0..15."""
    blocks, k = packed.shape[0], packed.shape[1] // 8
    steps = packed.reshape(blocks, k // 8, INT4_BLOCK, 4).permute(0, 2, 1, 3)  # [block, r, step, t]
    return torch.stack([steps & 0x0F, steps >> 4], dim=3).reshape(blocks * INT4_BLOCK, k)


def interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-row, per-group [N, G] -> [N / 16, G, 16]: the 16 rows of a block side by side (x16 scales / zeros)."""
    return t.reshape(-1, INT4_BLOCK, t.shape[1]).transpose(1, 2).contiguous()


def deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """Inverse of `interleave_rows`: [N / 16, G, 16] -> [N, G]."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


def head_method(method: str, lm_head: bool | str) -> str | None:
    """The output head's method: the layers' (True), the one named ("int8" / "int4"), or None (False: float)."""
    if lm_head is True:
        return method
    if lm_head is False or lm_head is None:
        return None
    if lm_head not in METHODS:
        raise ValueError(f"quantize_lm_head={lm_head!r}: expected True, False or one of {METHODS}")
    return lm_head


def quantize_model(
    model: nn.Module, method: str, group_size: int = 64, targets: str = DEFAULT_TARGETS, lm_head: bool | str = True
) -> nn.Module:
    """Replace the matching Linear layers of `model` in place, one at a time (their float weight is freed);
    `lm_head`: also quantize the output head, with the layers' method (True) or the one named ("int8" / "int4";
    skipped when it shares the embeddings' weight)."""
    if method not in METHODS:
        raise ValueError(f"quantize={method!r} is not supported; choose one of {METHODS}")
    head_kind = head_method(method, lm_head)
    pattern = re.compile(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not names:
        raise ValueError(f"no linear layer matches {targets!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        try:
            quantized = QuantizedLinear.from_linear(getattr(parent, child), BITS[method], group_size)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        setattr(parent, child, quantized)
    head = _quantizable_head(model) if head_kind else None
    if head is not None:
        model.lm_head = QuantizedLinear.from_linear(head, BITS[head_kind], group_size)
    model.config.extra["quantization_config"] = quantization_config(
        method, group_size, targets, head_kind if head is not None else None)
    return model


def _quantizable_head(model: nn.Module) -> nn.Linear | None:
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or model.config.tie_word_embeddings:
        return None
    return head


def quantization_config(method: str, group_size: int, targets: str, lm_head: str | None = None) -> dict:
    """`lm_head`: "int8" / "int4" when the output head is quantized too, None (the key absent) when it stays
    float."""
    config = {"quant_method": "idefics2", "method": method, "group_size": group_size, "targets": targets,
              "int4_layout": INT4_LAYOUT}
    return {**config, "lm_head": lm_head} if lm_head else config


def prepare_quantized_skeleton(model: nn.Module, config: dict) -> None:
    """Before loading a quantized checkpoint: put empty QuantizedLinear modules where it has them."""
    bits = BITS[config["method"]]
    if bits == 4 and config.get("int4_layout") != INT4_LAYOUT:
        raise ValueError(f"this int4 checkpoint uses the layout {config.get('int4_layout', 'pairs')!r} of an earlier "
                         f"idefics2 version (now {INT4_LAYOUT!r}); quantize the float checkpoint again with "
                         "`idefics2 quantize`")
    pattern = re.compile(config.get("targets", DEFAULT_TARGETS))
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and pattern.search(name):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    QuantizedLinear(module.in_features, module.out_features, bits, config.get("group_size", 64)))
    stored_head = config.get("lm_head")
    if stored_head not in (None, *METHODS):
        raise ValueError(f"this checkpoint's lm_head is quantized as {stored_head!r}; only 'int8' and 'int4' are known")
    head = _quantizable_head(model) if stored_head else None  # a base Idefics2Model has no head
    if head is not None:
        model.lm_head = QuantizedLinear(head.in_features, head.out_features, BITS[stored_head],
                                        config.get("group_size", 64))
