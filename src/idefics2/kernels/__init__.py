"""Compiled CPU kernels, built on first use with torch.utils.cpp_extension (needs ninja and a C++ compiler).

`int8_matmul` / `int4_matmul` are the same streaming kernel for weight-only quantized layers (see
`idefics2.quantize`); they return None where they do not apply, and the caller uses torch's own op.

`small_batch_linear(x, weight, bias)` is F.linear for decoding: at <= 16 rows it streams the weight once
at close to memory bandwidth (fp32 or bf16 weights, fp32 accumulation), where MKL/oneDNN fall well below
it (fp32 at 4-16 rows, bf16 at every size). fp32 at 1-2 rows stays with F.linear (MKL gemv is as fast).
bf16 weights at 17-128 rows (short prompts) go through `prefill_gemm` on AVX-512 machines without AMX, more rows
through `_bf16_linear_in_fp32`. When no kernel can be used (build impossible, IDEFICS2_DISABLE_KERNELS=1, other
devices, dtypes or shapes, autograd) it is exactly F.linear; `kernel_available()` / `kernel_status()` say why.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FP32_MIN_ROWS", "MAX_ROWS", "composite_on_white", "cpu_memory_pool", "cpu_memory_pool_stats",
           "dropout_linear", "dropout_linear_applies", "dropout_linear_grad_input", "dropout_linear_grad_weight", "gelu_tanh_",
           "int4_matmul", "int4_matmuls", "int8_matmul", "int8_matmuls", "kernel_available", "kernel_status",
           "lut_to_chw", "seeded_dropout", "silu_mul_", "small_batch_linear", "small_batch_linears"]

MAX_ROWS = 16  # the kernel keeps one accumulator set per row of x; beyond this GEMM libraries win
# fp32 x fp32 at 1-2 rows: MKL's gemv already streams at bandwidth (measured equal or slightly ahead of
# the kernel), so F.linear keeps those; bf16 and mixed weights use the kernel at every size.
FP32_MIN_ROWS = 3
# bf16 weights at 17..128 rows on AVX-512 machines without AMX: `prefill_gemm` widens each group of weight rows in
# L1 instead of widening whole blocks into an fp32 copy for MKL (`_bf16_linear_in_fp32`): 1.26-1.28x at 64-107 rows,
# slower from ~256 rows on (see prefill_gemm.cpp). fp32 weights stay with MKL at every size above MAX_ROWS.
PREFILL_MAX_ROWS = 128
# IDEFICS2_PREFILL_GEMM=0 keeps those rows on the widen-and-MKL path (for A/B measurements)
_prefill_enabled = {"on": os.environ.get("IDEFICS2_PREFILL_GEMM", "1") != "0"}
_SOURCES = [Path(__file__).with_name(name)
            for name in ("small_gemm.cpp", "decode_attention.cpp", "decode_layer.cpp", "image_ops.cpp", "dropout.cpp",
                         "memory_pool.cpp", "prefill_gemm.cpp", "activation.cpp")]
_DISABLE_ENV = "IDEFICS2_DISABLE_KERNELS"

_lock = threading.Lock()
_state: dict = {"tried": False, "op": None, "status": "not built yet"}


@functools.cache
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: -march=native builds must not be shared across CPUs."""
    return hashlib.sha1(f"{platform.machine()} {_cpu_flags()}".encode()).hexdigest()[:8]


def _bf16_gemm_is_slow() -> bool:
    """x86 CPUs without AMX multiply bf16 matrices slower than fp32 ones (oneDNN's AVX512-BF16 path runs at
    about half of MKL's sgemm on the 2-core machine this was measured on); with AMX, bf16 is the fast path."""
    flags = _cpu_flags().split()
    return platform.machine() in ("x86_64", "AMD64") and "amx_bf16" not in flags


def _build() -> tuple[object | None, str]:
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return None, f"disabled by {_DISABLE_ENV}"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary next to the interpreter)
        except ImportError:
            return None, "ninja is not installed (pip install ninja)"
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
        cpp_extension.load(
            name=f"idefics2_small_gemm_{_cpu_tag()}",
            sources=[str(source) for source in _SOURCES],
            # -fopenmp: at::parallel_for is inline OpenMP code in torch's headers; without it the kernel
            # runs serially. The extension then shares the libgomp.so.1 that torch has already loaded.
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        op = torch.ops.idefics2_kernels
        return op, f"compiled ({op.isa()})"
    except Exception as e:  # noqa: BLE001  (any build or load failure means: use F.linear)
        msg = str(e).strip().splitlines()
        return None, f"build failed: {type(e).__name__}: {msg[-1] if msg else ''}"[:500]


def _ops():
    """The compiled op namespace, or None; builds at most once per process (thread-safe)."""
    if _state["tried"]:
        return _state["op"]
    with _lock:
        if not _state["tried"]:
            op, status = _build()
            _state.update(op=op, status=status, tried=True)
            if op is None and not status.startswith("disabled"):
                warnings.warn(f"idefics2.kernels: using F.linear ({status})", RuntimeWarning, stacklevel=3)
    return _state["op"]


@functools.cache
def _avx512_kernels() -> bool:
    """Whether the build has the AVX-512 kernels (prefill_gemm, gelu_tanh_, silu_mul_; the others have fallbacks
    inside for AVX2 / scalar builds)."""
    op = _ops()
    return op is not None and op.isa() == "avx512"


def kernel_available() -> bool:
    """True when the compiled kernel is loaded (building it now if it was not tried yet)."""
    return _ops() is not None


def kernel_status() -> str:
    """'compiled (avx512|avx2|scalar)', or why the kernel is not available."""
    _ops()
    return _state["status"]


def _kernel_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Which compiled op serves F.linear(x, weight, bias): "small" (decoding: <= MAX_ROWS rows), "prefill"
    (bf16 weights, up to PREFILL_MAX_ROWS rows, AVX-512 machines) or None (F.linear / `_fallback`)."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2 or x.dim() < 1:
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16) or not weight.is_contiguous():
        return None
    if not (x.dtype == weight.dtype or (x.dtype == torch.float32 and weight.dtype == torch.bfloat16)):
        return None
    rows = math.prod(x.shape[:-1])
    if x.shape[-1] != weight.shape[1] or rows > PREFILL_MAX_ROWS:
        return None
    if weight.dtype == torch.float32 and rows < FP32_MIN_ROWS:
        return None
    if bias is not None and (
        bias.device.type != "cpu" or bias.shape != (weight.shape[0],) or bias.dtype not in (x.dtype, weight.dtype)
    ):
        return None
    if _needs_grad(x, weight, bias):  # the kernels have no backward
        return None
    if rows <= MAX_ROWS:
        return "small"
    if weight.dtype != torch.bfloat16 or not _prefill_enabled["on"]:
        return None
    # with AMX, oneDNN's bf16 GEMM is the fast path; fp32 x with bf16 weight would otherwise widen all of it
    if x.dtype == torch.bfloat16 and not _bf16_gemm_is_slow():
        return None
    return "prefill" if _avx512_kernels() else None


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


WIDE_BLOCK_BYTES = 32 << 20  # fp32 copy of a weight block in `_bf16_linear_in_fp32`


def _bf16_linear_in_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 F.linear for many rows (prefill) through the fp32 GEMM: bf16 values widen to fp32 exactly and the
    GEMM accumulates in fp32, then the result is rounded to bf16 once, the arithmetic of a bf16 GEMM (only the
    summation order differs); blocks of weight rows are widened one at a time (<= 32 MiB)."""
    xf = x.reshape(-1, x.shape[-1]).float()
    n = weight.shape[0]
    out = torch.empty(xf.shape[0], n, dtype=torch.bfloat16)
    block = max(256, WIDE_BLOCK_BYTES // (4 * weight.shape[1]))
    for n0 in range(0, n, block):
        rows = slice(n0, min(n, n0 + block))
        out[:, rows] = F.linear(xf, weight[rows].float(), None if bias is None else bias[rows].float())
    return out.reshape(*x.shape[:-1], n)


def _fallback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dtype != weight.dtype and weight.dtype == torch.bfloat16 and x.dtype == torch.float32:
        # fp32 activations with bf16 weights: same meaning as the kernel (weights widened to fp32)
        weight = weight.float()
        bias = bias.float() if bias is not None else None
    elif (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.device.type == "cpu"
          and x.dim() >= 1 and x.numel() > MAX_ROWS * x.shape[-1] and _bf16_gemm_is_slow()
          and (bias is None or bias.dtype == torch.bfloat16) and not _needs_grad(x, weight, bias)):
        return _bf16_linear_in_fp32(x, weight, bias)
    return F.linear(x, weight, bias)


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the streaming kernel when x has <= 16 rows (and bf16 weights through
    the prefill kernel up to 128 rows).

    Also accepts fp32 x with bf16 weight (result fp32, weights widened to fp32), which F.linear rejects.
    """
    kind = _kernel_for(x, weight, bias)
    op = _ops() if kind is not None else None
    if op is None:
        return _fallback(x, weight, bias)
    lead = x.shape[:-1]
    gemm = op.small_gemm if kind == "small" else op.prefill_gemm
    y = gemm(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.reshape(*lead, weight.shape[0])


def small_batch_linears(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """[F.linear(x, w) for w in weights] (bias-free, same in_features), in one kernel call when it applies.

    One call packs x once and wakes the threads once for all the weights (q/k/v, gate/up at decode time).
    """
    if len(weights) < 2 or any(w.dtype != weights[0].dtype for w in weights) \
            or not all(_kernel_for(x, w, None) == "small" for w in weights):
        return [small_batch_linear(x, w) for w in weights]
    op = _ops()
    if op is None:
        return [_fallback(x, w, None) for w in weights]
    lead = x.shape[:-1]
    ys = op.small_gemm_multi(x.reshape(-1, x.shape[-1]), weights)
    return [y.reshape(*lead, y.shape[-1]) for y in ys]


def _quantized_kernel_applies(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= MAX_ROWS
            and x.dtype in (torch.float32, torch.bfloat16) and not (torch.is_grad_enabled() and x.requires_grad))


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x [B, K] @ (qweight [N, K] int8 * scales [N] fp32)^T in fp32 arithmetic, or None (use torch's op)."""
    ys = int8_matmuls(x, [qweight], [scales])
    return None if ys is None else ys[0]


def int8_matmuls(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """`int8_matmul` for several weights of the same in_features in one kernel call, or None."""
    if not _quantized_kernel_applies(x):
        return None
    op = _ops()
    return None if op is None else op.small_gemm_int8_multi(x, qweights, scales)


def int4_kernel_available() -> bool:
    """The int4 decoding kernel is built and this CPU has AVX512-VNNI."""
    op = _ops()
    return op is not None and op.has_int4()


def int4_matmuls(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor],
                 zeros: list[torch.Tensor], group_size: int) -> list[torch.Tensor] | None:
    """`int4_matmul` for several weights of the same in_features in one kernel call (q/k/v, gate/up), or None."""
    if not _quantized_kernel_applies(x) or group_size not in (32, 64, 128) or x.shape[1] % group_size:
        return None
    if not int4_kernel_available():
        return None
    return _ops().small_gemm_int4(x, qweights, scales, zeros, group_size)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor | None:
    """x [B, K] @ W^T for int4 weights in the x16 layout of `idefics2.quantize`, or None (use torch's op).

    Needs AVX512-VNNI; x is rounded to int8 per row and group (scale max |x| / 127), accumulation is exact
    int32 per group, then fp32.
    """
    ys = int4_matmuls(x, [qweight], [scales], [zeros], group_size)
    return None if ys is None else ys[0]


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """fp32 [N, K] = qweight * scales[:, None] (fp32 scales), or None where the kernel is unavailable."""
    op = _ops()
    return None if op is None or qweight.device.type != "cpu" else op.dequantize_int8(qweight, scales)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor | None:
    """fp32 [N, K] of x16-packed int4 weights ([N / 16, 8 K], scales / zeros [N / 16, K / group, 16]), or None
    where the kernel is unavailable."""
    op = _ops()
    if op is None or qweight.device.type != "cpu":
        return None
    return op.dequantize_int4(qweight, scales, zeros, group_size)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm in one op (rows in parallel), or None: the caller computes it with torch ops."""
    if (x.device.type != "cpu" or x.dim() < 1
            or x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype not in (torch.float32, torch.bfloat16)
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    op = _ops()
    return None if op is None else op.rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Rotary embedding (x [B, H, T, D], cos/sin [B, T, D]) in one op, bit-identical to the torch ops, or None."""
    if (x.device.type != "cpu" or x.dim() != 4 or cos.dtype != x.dtype
            or sin.dtype != x.dtype or x.dtype not in (torch.float32, torch.bfloat16)
            or (torch.is_grad_enabled() and x.requires_grad)):
        return None
    op = _ops()
    return None if op is None else op.rope(x, cos, sin)


def gelu_tanh_(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x = gelu(x + bias, approximate="tanh") in place (inference, contiguous fp32/bf16 CPU tensors, AVX-512
    machines), 4-5x faster than torch's tanh GELU and without a separate bias pass; None where it does not apply
    (x untouched): the caller uses torch's op. Agrees with torch's formula to a few ulp (see activation.cpp)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous()
            or x.dim() < 1 or _needs_grad(x, bias)):
        return None
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != x.dtype or bias.shape != x.shape[-1:]):
        return None
    if not _avx512_kernels():
        return None
    return _ops().gelu_tanh_(x, bias)


def silu_mul_(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """gate = silu(gate) * up in place, one pass (inference, contiguous fp32/bf16 CPU tensors of one shape,
    AVX-512 machines), or None (gate untouched): the caller uses torch's ops. Torch's silu formula with the
    kernels' own exp: within a few ulp of torch's ops."""
    if (gate.device.type != "cpu" or up.device.type != "cpu" or gate.dtype not in (torch.float32, torch.bfloat16)
            or up.dtype != gate.dtype or gate.shape != up.shape or not gate.is_contiguous() or not up.is_contiguous()
            or _needs_grad(gate, up) or not _avx512_kernels()):
        return None
    return _ops().silu_mul_(gate, up)


def decode_attention_applies(q: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` can run this step: CPU, fp32/bf16, contiguous cache, no autograd, kernel built."""
    if (q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16) or key_cache.dtype != q.dtype
            or key_cache.device.type != "cpu" or not key_cache.is_contiguous()
            or (torch.is_grad_enabled() and q.requires_grad)):
        return False
    return _ops() is not None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     key_cache: torch.Tensor, value_cache: torch.Tensor, positions: torch.Tensor,
                     key_valid: torch.Tensor | None, kv_len: int, scale: float) -> torch.Tensor:
    """One decoding step of attention in one op (where `decode_attention_applies`): RoPE on q and k, k/v written
    into the caches [B, Hkv, capacity, D] at [b, :, positions[b]], softmax attention over the keys row b may
    see (j <= positions[b], j < kv_len, key_valid bool [B|1, 1, 1, kv_len] where given). q [B, 1, Hq*D] and
    k/v [B, 1, Hkv*D] before RoPE, cos/sin [B, 1, D]; returns [B, 1, Hq*D]."""
    return _ops().decode_attention(q, k, v, cos, sin, key_cache, value_cache, positions, key_valid, kv_len, scale)


DECODE_FLOAT, DECODE_INT8, DECODE_INT4 = 0, 1, 2  # weight kinds of `decode_layer`


def decode_layer(x: torch.Tensor, ln1: torch.Tensor, ln2: torch.Tensor, eps: float, kind: int,
                 qkv: list[torch.Tensor], o: list[torch.Tensor], gate_up: list[torch.Tensor], down: list[torch.Tensor],
                 group: int, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 positions: torch.Tensor, key_valid: torch.Tensor | None, kv_len: int, scale: float) -> torch.Tensor:
    """A whole Mistral decoder layer for one decoding step ([B, 1, H] -> [B, 1, H]) in one op: the same kernels
    and ATen ops the Python layer calls (bit-identical), without the Python between them. The weight lists
    by kind: DECODE_FLOAT [W] per projection, DECODE_INT8 [qweights..., fp32 scales...], DECODE_INT4
    [qweights..., scales..., zeros...]. Only for inputs where `decode_attention_applies`."""
    return _ops().decode_layer(x, ln1, ln2, eps, kind, qkv, o, gate_up, down, group, cos, sin, key_cache,
                               value_cache, positions, key_valid, kv_len, scale)


def decode_layers(x: torch.Tensor, ln1: list[torch.Tensor], ln2: list[torch.Tensor], eps: float, kind: int,
                  qkv: list[torch.Tensor], o: list[torch.Tensor], gate_up: list[torch.Tensor], down: list[torch.Tensor],
                  group: int, cos: torch.Tensor, sin: torch.Tensor, key_caches: list[torch.Tensor],
                  value_caches: list[torch.Tensor], positions: torch.Tensor, key_valid: torch.Tensor | None,
                  kv_len: int, scale: float) -> torch.Tensor:
    """`decode_layer` for every layer of the decoder in one op: the per-layer lists concatenated in layer order
    (layer i's norms and caches at index i, its weights at i * the per-layer count)."""
    return _ops().decode_layers(x, ln1, ln2, eps, kind, qkv, o, gate_up, down, group, cos, sin, key_caches,
                                value_caches, positions, key_valid, kv_len, scale)


# ---- training ------------------------------------------------------------------------------------------------
_U32 = 0xFFFFFFFF
_DROPOUT_CHUNK = 1 << 22  # elements per pass where seeded_dropout runs as torch ops


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """dropout.cpp's 32-bit hash on int64 tensors holding values in [0, 2^32) (products stay below 2^59)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _U32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _U32
    return (x >> 16) ^ x


def _dropout_params(p: float, seeds: tuple[int, int]) -> tuple[int, float, int, int]:
    """(threshold = p * 2^32, scale = 1 / (1 - p), seed_a, seed_b) as the kernels take them."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    return min(round(p * 2.0**32), 1 << 32), scale, int(seeds[0]) & _U32, int(seeds[1]) & _U32


def seeded_dropout(x: torch.Tensor, p: float, seeds: tuple[int, int]) -> torch.Tensor:
    """Dropout whose mask is a function of `seeds` (two ints in [0, 2^32)) and the element index only.

    `x * mask / (1 - p)`, so the same call gives the same mask again: a backward pass regenerates it instead
    of storing it, and since dropout is linear, `seeded_dropout(grad, p, seeds)` is the gradient. On the CPU,
    element i (row-major) is kept where hash(seeds, i) >= p * 2^32: the compiled kernel, or the same hash in
    torch ops (bit-identical). On other devices the mask comes from the device's own generator (Philox on
    CUDA) seeded with the two seeds: as reproducible, and as fast as torch's dropout there. No autograd of its
    own (see idefics2.training.lora)."""
    threshold, scale, seed_a, seed_b = _dropout_params(p, seeds)
    if x.device.type == "cpu":
        if x.numel() > 1 << 32:
            raise ValueError(f"seeded_dropout handles at most 2^32 elements, got {x.numel()}")
        op = _ops() if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else None
        if op is not None:
            return op.seeded_dropout(x, threshold, scale, seed_a, seed_b)

        def keep(start: int, count: int) -> torch.Tensor:
            index = torch.arange(start, start + count, dtype=torch.int64)
            return _mix32(_mix32((index + seed_a) & _U32) ^ seed_b) >= threshold
    else:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed_a << 32 | seed_b)

        def keep(start: int, count: int) -> torch.Tensor:  # chunks are drawn in order: the same every call
            return torch.rand(count, device=x.device, generator=generator) >= p

    # In chunks, so the temporaries (int64 indices, fp32 draws) stay small next to a large activation.
    flat, out = x.reshape(-1), torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    for start in range(0, flat.numel(), _DROPOUT_CHUNK):
        part = flat[start:start + _DROPOUT_CHUNK]
        out[start:start + part.numel()] = torch.where(keep(start, part.numel()), part * scale, zero)
    return out.view(x.shape)


def dropout_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused `dropout_linear*` kernels serve these operands: CPU float32 (no autocast), kernel built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2 and x.numel() <= 1 << 32
            and not _cpu_autocast() and _ops() is not None)


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float, seeds: tuple[int, int]) -> torch.Tensor:
    """F.linear(seeded_dropout(x, p, seeds), weight) without materialising the dropped x (where
    `dropout_linear_applies`); x [..., K], weight [R, K] -> [..., R]."""
    out = _ops().dropout_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
                                *_dropout_params(p, seeds))
    return out.reshape(*x.shape[:-1], weight.shape[0])


def dropout_linear_grad_input(grad: torch.Tensor, weight: torch.Tensor, p: float,
                              seeds: tuple[int, int]) -> torch.Tensor:
    """seeded_dropout(grad @ weight, p, seeds) in one pass; grad [..., R] -> [..., K]."""
    out = _ops().dropout_linear_grad_input(grad.reshape(-1, grad.shape[-1]).contiguous(), weight.contiguous(),
                                           *_dropout_params(p, seeds))
    return out.reshape(*grad.shape[:-1], weight.shape[1])


def dropout_linear_grad_weight(grad: torch.Tensor, x: torch.Tensor, p: float, seeds: tuple[int, int]) -> torch.Tensor:
    """grad^T @ seeded_dropout(x, p, seeds) without materialising the dropped x; -> [R, K]."""
    return _ops().dropout_linear_grad_weight(grad.reshape(-1, grad.shape[-1]).contiguous(),
                                             x.reshape(-1, x.shape[-1]).contiguous(), *_dropout_params(p, seeds))


# ---- CPU memory pool (training) -----------------------------------------------------------------------------
_POOL_STATS = ("enabled", "live_bytes", "cached_bytes", "peak_live_bytes", "mapped_bytes", "hits", "misses")


@contextlib.contextmanager
def cpu_memory_pool(threshold: int = 256 << 10):
    """Within the block, torch's CPU tensors of `threshold` bytes or more come from a pool that keeps freed
    blocks for the next request of the same size (up to 1/4 larger), as torch's CUDA caching allocator does
    (`memory_pool.cpp` says why: glibc's heap fragments under a training step's allocations and page faults
    dominate without it). Yields whether the pool is installed (False where the kernels are unavailable or
    another allocator has priority); on exit the previous allocator is back and the cache is unmapped (blocks
    still in use return to the pool's bookkeeping when freed). Nested use keeps the outer pool."""
    op = _ops()
    if op is None:
        yield False
        return
    outer = bool(op.memory_pool_stats()[0])
    enabled = bool(op.memory_pool_enable(int(threshold))) if not outer else True
    try:
        yield enabled
    finally:
        if enabled and not outer:
            op.memory_pool_disable()


def cpu_memory_pool_stats(reset_peak: bool = False) -> dict[str, int] | None:
    """The pool's counters (bytes live / cached / peak live / mapped, hits and misses since the last reset),
    or None without the kernels. `reset_peak` starts a new peak and new hit counts after reading."""
    op = _ops()
    if op is None:
        return None
    stats = dict(zip(_POOL_STATS, op.memory_pool_stats()))
    stats["enabled"] = bool(stats["enabled"])
    if reset_peak:
        op.memory_pool_reset_peak()
    return stats


# ---- image preprocessing (idefics2.image_processing): numpy in, numpy out ----------------------------------
def _pixel_rows(array: np.ndarray, channels: int) -> bool:
    """An (H, W, channels) uint8 array whose pixels are packed along each row (rows may be a crop's stride)."""
    return (array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == channels and array.strides[2] == 1
            and array.strides[1] == channels and array.strides[0] >= channels * array.shape[1])


def lut_to_chw(pixels: np.ndarray, lut: np.ndarray, out: np.ndarray) -> bool:
    """`out[c] = lut[c][pixels[..., c]]` for an (H, W, 3) uint8 image (or (H, W, 4) RGBX, the 4th channel
    unused), into the float32 (3, H, W) view `out` (rows contiguous, e.g. a slot of a padded batch), in one pass.
    False where the kernel is unavailable (then nothing was written). Read-only inputs (PIL's buffers) are fine:
    they are read through their address."""
    op = _ops()
    height, width = pixels.shape[:2]
    channels = pixels.shape[2] if pixels.ndim == 3 else 0
    if (op is None or channels not in (3, 4) or not _pixel_rows(pixels, channels) or lut.dtype != np.float32
            or lut.shape != (3, 256) or not lut.flags.c_contiguous or out.dtype != np.float32
            or out.shape != (3, height, width) or out.strides[2] != 4 or not out.flags.writeable):
        return False
    op.lut_to_chw(pixels.ctypes.data, height, width, pixels.strides[0], channels, torch.from_numpy(lut),
                  torch.from_numpy(out))
    return True


def composite_on_white(rgba: np.ndarray, table: np.ndarray) -> np.ndarray | None:
    """(H, W, 4) uint8 RGBX: `table[alpha << 8 | value]` per channel of an (H, W, 4) uint8 RGBA image, the 4th
    byte 255 (PIL's layout for RGB, so PIL can wrap it without a copy), or None where the kernel is
    unavailable."""
    op = _ops()
    if op is None or not _pixel_rows(rgba, 4) or table.dtype != np.uint8 or table.shape != (65536,) \
            or not table.flags.c_contiguous:
        return None
    out = np.empty(rgba.shape[:2] + (4,), dtype=np.uint8)
    op.composite_on_white(rgba.ctypes.data, rgba.shape[0], rgba.shape[1], rgba.strides[0], torch.from_numpy(table),
                          torch.from_numpy(out))
    return out
