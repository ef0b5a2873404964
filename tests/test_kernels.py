"""idefics2.kernels.small_batch_linear: same results as F.linear, dispatch rules, and the fallback.

The first test to need the kernel compiles it (about 15-30 s on two cores; cached afterwards in
~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR). Kernel-specific tests skip where it cannot be built.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

import idefics2.kernels as K
from idefics2.kernels import kernel_available, kernel_status, small_batch_linear

needs_kernel = pytest.mark.skipif(
    os.environ.get("IDEFICS2_DISABLE_KERNELS", "") not in ("", "0") or not kernel_available(),
    reason=f"compiled kernel unavailable: {kernel_status()}",
)

BATCHES = [1, 2, 3, 4, 7, 8, 16]


def _data(b: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    """Unit-scale outputs: x ~ N(0, 1), W ~ N(0, 1/k)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, generator=g)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    bb = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, bb


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the compiled op (or into _ops() where the kernel is unavailable)."""
    calls = []
    real = K._ops

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(K, "_ops", counting)
    return calls


@needs_kernel
def test_status_names_the_isa():
    assert kernel_status().startswith("compiled (")


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("b", BATCHES)
def test_fp32_matches_f_linear(b, bias, kernel_calls):
    x, w, bb = _data(b, 37, 1000, torch.float32, bias)
    y = small_batch_linear(x, w, bb)
    assert bool(kernel_calls) == (b >= K.FP32_MIN_ROWS), "wrong dispatch"
    if b < K.FP32_MIN_ROWS:  # public API routes these to F.linear: check the kernel itself too
        y = K._ops().small_gemm(x, w, bb)
    assert y.dtype == torch.float32 and y.shape == (b, 37)
    torch.testing.assert_close(y, F.linear(x, w, bb), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("b", BATCHES)
def test_bf16_matches_fp32_reference(b, bias):
    x, w, bb = _data(b, 37, 1000, torch.bfloat16, bias)
    xb = x.bfloat16()
    y = small_batch_linear(xb, w, bb)
    assert y.dtype == torch.bfloat16 and y.shape == (b, 37)
    ref = F.linear(xb.float(), w.float(), bb.float() if bias else None)
    # fp32 accumulation of exact bf16 products: only the final rounding to bf16 (2^-8 relative) differs
    torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=8e-3)


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("b", [1, 5, 16])
def test_fp32_activations_bf16_weight(b, bias):
    x, w, bb = _data(b, 37, 1000, torch.bfloat16, bias)
    y = small_batch_linear(x, w, bb)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w.float(), bb.float() if bias else None), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,b", [(517, 1040, 16), (1030, 512, 9), (3, 7, 2), (64, 1024, 6)])
def test_other_shapes(n, k, b, dtype):
    """Several threads, several batch chunks, K with and without a tail."""
    x, w, bb = _data(b, n, k, dtype, bias=True, seed=1)
    x = x.to(dtype)
    ref = F.linear(x.float(), w.float(), bb.float())
    tol = 1e-4 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(small_batch_linear(x, w, bb).float(), ref, rtol=tol, atol=tol)


@needs_kernel
def test_3d_input_and_inference_mode(kernel_calls):
    x, w, bb = _data(6, 37, 1000, torch.float32, bias=True)
    x3 = x.reshape(2, 3, 1000)
    with torch.inference_mode():
        y = small_batch_linear(x3, w, bb)
    assert kernel_calls and y.shape == (2, 3, 37)
    torch.testing.assert_close(y, F.linear(x3, w, bb), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_threads_respected():
    x, w, _ = _data(8, 300, 1000, torch.float32, bias=False)
    ref = F.linear(x, w)
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(small_batch_linear(x, w), ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(old)


# ---- dispatch rules: these hold with or without the compiled kernel ------------------------------------


def test_more_than_16_rows_uses_f_linear(kernel_calls):
    x, w, bb = _data(17, 37, 1000, torch.float32, bias=True)
    y = small_batch_linear(x, w, bb)
    assert not kernel_calls
    assert torch.equal(y, F.linear(x, w, bb))
    x3 = x[:8].reshape(1, 8, 1000).expand(3, 8, 1000)  # 24 rows
    assert torch.equal(small_batch_linear(x3, w), F.linear(x3, w))


def test_non_contiguous_weight_uses_f_linear(kernel_calls):
    x, w, _ = _data(4, 37, 1000, torch.float32, bias=False)
    wt = w.t().contiguous().t()  # same values, column-major
    assert not wt.is_contiguous()
    y = small_batch_linear(x, wt)
    assert not kernel_calls
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_unsupported_dtypes_and_autograd_use_f_linear(kernel_calls):
    x, w, bb = _data(2, 37, 1000, torch.float64, bias=True)
    x = x.double()
    assert torch.equal(small_batch_linear(x, w, bb), F.linear(x, w, bb))
    x, w, bb = _data(2, 37, 1000, torch.float32, bias=True)
    w.requires_grad_(True)
    y = small_batch_linear(x, w, bb)
    y.sum().backward()  # the kernel has no backward: F.linear must have been used
    assert not kernel_calls and w.grad is not None


def test_mismatched_dtypes_raise_like_f_linear():
    x, w, _ = _data(2, 37, 1000, torch.float32, bias=False)
    with pytest.raises(RuntimeError):
        small_batch_linear(x.bfloat16(), w)  # bf16 x with fp32 weight: F.linear refuses too


def test_missing_ninja_is_reported(monkeypatch):
    monkeypatch.delenv("IDEFICS2_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(K.shutil, "which", lambda _name: None)
    monkeypatch.setitem(sys.modules, "ninja", None)  # makes `import ninja` fail
    op, status = K._build()
    assert op is None and "ninja" in status


def test_disable_env_falls_back_to_f_linear():
    code = textwrap.dedent(
        """
        import torch, torch.nn.functional as F, warnings
        warnings.simplefilter("error")  # disabling on purpose must not warn
        from idefics2.kernels import kernel_available, kernel_status, small_batch_linear
        x, w, b = torch.randn(3, 100), torch.randn(37, 100), torch.randn(37)
        assert torch.equal(small_batch_linear(x, w, b), F.linear(x, w, b))
        xb, wb = x.bfloat16(), w.bfloat16()
        assert torch.equal(small_batch_linear(xb, wb), F.linear(xb, wb))
        assert torch.equal(small_batch_linear(x, wb), F.linear(x, wb.float()))
        assert not kernel_available()
        print(kernel_status())
        """
    )
    env = dict(os.environ, IDEFICS2_DISABLE_KERNELS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IDEFICS2_DISABLE_KERNELS" in out.stdout


# ---------------------------------------------------------------------------------------------------------
# int8 / int4 weight-only kernels (idefics2.quantize layouts)

def _int8_data(b: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) / (127 * k**0.5)
    return torch.randn(b, k, generator=g), q, scales


@needs_kernel
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("n, k", [(96, 128), (37, 200), (1030, 1024)])
def test_int8_kernel_matches_dequantized_matmul(b, n, k):
    x, q, scales = _int8_data(b, n, k)
    w = q.double() * scales.double()[:, None]
    expected = x.double() @ w.t()
    y = K.int8_matmul(x, q, scales)
    assert y.dtype == torch.float32
    if K._ops().vnni_int8(k):
        # x goes in as int16 codes, one scale per 512 values of a row: each value is off by at most half a step
        # (max |x| over its chunk / 32767), so the result by at most sum_k |w[n, k]| * step_k / 2.
        chunks = x.abs().double().split(512, dim=1)
        step = torch.cat([c.amax(dim=1, keepdim=True).expand_as(c) for c in chunks], dim=1) / 32767
        bound = (step / 2) @ w.abs().t() + 1e-6 * expected.abs() + 1e-6
        assert ((y.double() - expected).abs() <= bound).all()
        assert (y.double() - expected).abs().max() > 0  # it does quantize: this is not the fp32 path
    else:
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    y16 = K.int8_matmul(x.to(torch.bfloat16), q, scales)  # bf16 in, bf16 out, fp32 arithmetic inside
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), (x.to(torch.bfloat16).double() @ (q.double() * scales.double()[:, None]).t()).float(),
                               rtol=1e-2, atol=1e-2)


def _int4_data(b: int, n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=g) / k**0.5).to(torch.bfloat16)
    zeros = (torch.randn(n, k // group, generator=g) / k**0.5).to(torch.bfloat16)
    return torch.randn(b, k, generator=g), values, scales, zeros


@pytest.mark.skipif(not kernel_available() or not K._ops().has_int4(), reason="int4 kernel needs AVX512-VNNI")
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n, k", [(96, 128), (48, 384), (1040, 1024)])
def test_int4_kernel_matches_dequantized_matmul(b, group, n, k):
    from idefics2.quantize import interleave_rows, pack_int4

    x, values, scales, zeros = _int4_data(b, n, k, group)
    w = ((values.double() - 8).reshape(n, -1, group) * scales.double()[..., None]
         + zeros.double()[..., None]).reshape(n, k)
    y = K.int4_matmul(x, pack_int4(values), interleave_rows(scales), interleave_rows(zeros), group)
    assert y.dtype == torch.float32
    # x goes in as int8 codes with one scale per group of a row (max |x| / 127, rounded to nearest even in fp32):
    # the result is the dequantized weight times exactly those quantized activations, up to fp32 rounding ...
    amax = x.abs().reshape(b, -1, group).amax(-1, keepdim=True)
    codes = torch.round(x.reshape(b, -1, group) * (127 / amax))
    quantized_x = (codes.double() * (amax / 127).double()).reshape(b, k)
    torch.testing.assert_close(y.double(), quantized_x @ w.t(), rtol=1e-4, atol=1e-4)
    # ... which is off the exact product by at most half a step per element
    expected = x.double() @ w.t()
    step = (amax.double() / 127).expand(b, k // group, group).reshape(b, k)
    assert ((y.double() - expected).abs() <= (step / 2) @ w.abs().t() + 1e-4).all()
    # bf16 in: the same arithmetic on the bf16 values, the fp32 result rounded to bf16 (nearest even) at the end
    x16 = x.to(torch.bfloat16)
    y16 = K.int4_matmul(x16, pack_int4(values), interleave_rows(scales), interleave_rows(zeros), group)
    y32 = K.int4_matmul(x16.float(), pack_int4(values), interleave_rows(scales), interleave_rows(zeros), group)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.to(torch.bfloat16))


def test_quantized_kernels_decline_what_they_do_not_cover():
    x, q, scales = _int8_data(17, 8, 128)
    assert K.int8_matmul(x, q, scales) is None  # more than 16 rows: torch's op
    x4, values, s4, z4 = _int4_data(2, 16, 192, 64)
    from idefics2.quantize import interleave_rows, pack_int4

    packed, s16, z16 = pack_int4(values), interleave_rows(s4), interleave_rows(z4)
    assert K.int4_matmul(x4[:, :96], packed, s16, z16, 64) is None  # K not a multiple of the group
    assert K.int4_matmul(x4, packed, s16, z16, 16) is None  # unsupported group
    grad_x = torch.randn(2, 128, requires_grad=True)
    assert K.int8_matmul(grad_x, q, scales) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 4, 9])
def test_several_weights_in_one_call_match_separate_calls(b, dtype, kernel_calls):
    x, _, _ = _data(b, 8, 96, dtype, False)
    x = x.to(dtype)
    weights = [_data(1, n, 96, dtype, False, seed=n)[1] for n in (64, 16, 16)]
    kernel_calls.clear()
    together = K.small_batch_linears(x, weights)
    assert len(kernel_calls) == 1 or (dtype == torch.float32 and b < K.FP32_MIN_ROWS)  # one call for all three
    for y, w in zip(together, weights):
        torch.testing.assert_close(y, small_batch_linear(x, w), rtol=0, atol=0)


def test_parallel_linears_calls_modules_that_are_not_plain_linears():
    from idefics2.layers import Linear, parallel_linears

    torch.manual_seed(0)
    a, b = Linear(32, 16, bias=False), Linear(32, 8, bias=False)
    x = torch.randn(2, 32)
    seen = []
    b.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        ya, yb = parallel_linears(x, a, b)  # b has a hook: both are called as modules
    assert seen == [(2, 8)]
    torch.testing.assert_close(ya, F.linear(x, a.weight))
    torch.testing.assert_close(yb, F.linear(x, b.weight))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden, tokens, head_dim", [(3, 256, 1, 4), (300, 1000, 107, 64), (40, 7, 33, 6)])
def test_fused_rms_norm_and_rope_match_the_torch_formulas(dtype, rows, hidden, tokens, head_dim):
    """Decoding (a few rows) and prefill (hundreds of rows, in parallel), hidden sizes off the 8-lane sums."""
    from idefics2.text import rotate_half

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, 1, hidden, generator=g) * 3).to(dtype)
    weight = torch.randn(hidden, generator=g).to(dtype)
    expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    # bf16: the fp64 sum of squares may round the normalised value to the neighbouring bf16 (one ulp)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-6}
    torch.testing.assert_close(K.rms_norm(x, weight, 1e-5), expected, **tol)
    q = torch.randn(2, tokens, 5, head_dim, generator=g).transpose(1, 2).to(dtype)  # [B, H, T, D], strided view
    cos = torch.randn(2, tokens, head_dim, generator=g).to(dtype)
    sin = torch.randn(2, tokens, head_dim, generator=g).to(dtype)
    expected = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
    assert torch.equal(K.rope(q, cos, sin), expected)  # same roundings as the separate ops
    # autograd: the caller's torch code
    assert K.rms_norm(torch.randn(1, hidden, requires_grad=True), weight, 1e-5) is None
    assert K.rope(q.clone().requires_grad_(), cos, sin) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_gelu_tanh_kernel_matches_torch_in_place(dtype, bias):
    """The tanh GELU kernel (x / (1 + exp(-2u)) with its own exp) against torch's op, over the whole range:
    zeros, tiny and huge values, tails of a row that are not a multiple of 16; bias added first, rounded as a
    tensor add rounds."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 1409, generator=g) * 4).to(dtype)
    x[0, :10] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 50, -50, 1e4, -1e4, 3e38, -3e38]).to(dtype)
    b = (torch.randn(1409, generator=g)).to(dtype) if bias else None
    expected = F.gelu(x + b if bias else x, approximate="tanh")
    y = x.clone()
    out = K.gelu_tanh_(y, b)
    assert out is not None and out.data_ptr() == y.data_ptr()  # in place
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=5e-6, atol=1e-6)
    else:  # computed in fp32, rounded once: one bf16 ulp apart where the fp32 values straddle a rounding tie,
        # and in the negative tail (|y| < 1e-4) torch's 1 + tanh(u) cancels to 0 where the kernel keeps the value
        torch.testing.assert_close(y, expected, rtol=8e-3, atol=1e-5)
        visible = expected.float().abs() > 1e-4
        assert ((y != expected) & visible).sum() < 0.005 * visible.sum()
    assert torch.isnan(K.gelu_tanh_(torch.tensor([float("nan")], dtype=dtype))).all()
    # what it does not cover: the caller uses torch's op (x untouched)
    assert K.gelu_tanh_(torch.randn(4, 8).t()) is None  # not contiguous
    assert K.gelu_tanh_(torch.randn(4, 8, dtype=torch.float64)) is None
    assert K.gelu_tanh_(torch.randn(4, 8), torch.randn(8, dtype=torch.float64)) is None
    leaf = torch.randn(4, 8, requires_grad=True)
    assert K.gelu_tanh_(leaf * 1) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_matches_torch_in_place(dtype):
    """silu(gate) * up in one pass against torch's two ops, tails of rows included; bf16 rounds silu's output
    before the product as the separate ops do."""
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(29, 1001, generator=g) * 5).to(dtype)
    gate[0, :6] = torch.tensor([0.0, -0.0, 100, -100, 1e4, -1e4]).to(dtype)
    up = torch.randn(29, 1001, generator=g).to(dtype)
    expected = F.silu(gate) * up
    y = gate.clone()
    out = K.silu_mul_(y, up)
    assert out is not None and out.data_ptr() == y.data_ptr()
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=5e-6, atol=1e-6)
    else:
        torch.testing.assert_close(y, expected, rtol=8e-3, atol=1e-5)
        visible = expected.float().abs() > 1e-4
        assert ((y != expected) & visible).sum() < 0.005 * visible.sum()
    assert K.silu_mul_(gate.clone(), up[:, :5]) is None  # shapes differ
    assert K.silu_mul_(torch.randn(4, 8).t(), torch.randn(8, 4)) is None  # not contiguous
    assert K.silu_mul_(torch.randn(4, 8) * 1, torch.randn(4, 8, requires_grad=True)) is None


def _reference_decode_attention(q, k, v, cos, sin, key_cache, value_cache, positions, key_valid, kv_len, scale):
    """The torch ops the fused decode attention replaces (RoPE, cache write, sdpa with a boolean mask)."""
    from idefics2.text import rotate_half

    b, hkv, _, d = key_cache.shape
    hq = q.shape[-1] // d
    qh = q.view(b, 1, hq, d).transpose(1, 2)
    kh = k.view(b, 1, hkv, d).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    qh, kh = qh * c + rotate_half(qh) * s, kh * c + rotate_half(kh) * s
    rows = torch.arange(b)
    key_cache[rows, :, positions] = kh[:, :, 0]
    value_cache[rows, :, positions] = v.view(b, hkv, d)
    allowed = torch.arange(kv_len)[None, :] <= positions[:, None]  # [B, K]
    if key_valid is not None:
        allowed = allowed & key_valid[:, 0, 0, :]
    out = F.scaled_dot_product_attention(qh, key_cache[:, :, :kv_len], value_cache[:, :, :kv_len],
                                         attn_mask=allowed[:, None, None, :], scale=scale, enable_gqa=hq != hkv)
    return out.transpose(1, 2).reshape(b, 1, hq * d)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv, d", [(16, 4, 64), (8, 8, 128), (6, 2, 40), (4, 1, 256)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_torch_ops(dtype, hq, hkv, d, masked):
    g = torch.Generator().manual_seed(hq * d)
    b, cap = 3, 96
    positions = torch.tensor([70, 41, 70])  # row 1 sits earlier, as in a slot cache
    kv_len = 71
    q, k, v = (torch.randn(b, 1, h * d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    angles = torch.rand(b, 1, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    caches = [torch.randn(b, hkv, cap, d, generator=g).to(dtype) for _ in range(2)]
    key_valid = None
    if masked:  # left padding on row 2, a sliding window on row 0
        key_valid = torch.ones(b, 1, 1, kv_len, dtype=torch.bool)
        key_valid[2, ..., :20] = False
        key_valid[0, ..., :50] = False
    ours_caches = [c.clone() for c in caches]
    ours = K.decode_attention(q, k, v, cos, sin, *ours_caches, positions, key_valid, kv_len, d**-0.5)
    ref = _reference_decode_attention(q, k, v, cos, sin, *caches, positions, key_valid, kv_len, d**-0.5)
    assert torch.equal(ours_caches[0], caches[0]) and torch.equal(ours_caches[1], caches[1])  # same RoPE roundings
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)


@needs_kernel
def test_decode_attention_row_without_visible_keys_is_zero():
    b, hkv, d = 2, 2, 64
    q, k, v = torch.randn(b, 1, 4 * d), torch.randn(b, 1, hkv * d), torch.randn(b, 1, hkv * d)
    cos, sin = torch.ones(b, 1, d), torch.zeros(b, 1, d)
    caches = [torch.randn(b, hkv, 8, d) for _ in range(2)]
    key_valid = torch.ones(b, 1, 1, 5, dtype=torch.bool)
    key_valid[1] = False
    out = K.decode_attention(q, k, v, cos, sin, *caches, torch.tensor([4, 4]), key_valid, 5, 0.125)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0


@needs_kernel
def test_decode_attention_rejects_positions_outside_the_keys():
    caches = [torch.zeros(1, 1, 8, 64) for _ in range(2)]
    x = torch.zeros(1, 1, 64)
    with pytest.raises(RuntimeError, match="position 5 outside the 5 keys"):
        K.decode_attention(x, x, x, x, x, *caches, torch.tensor([5]), None, 5, 0.125)
    with pytest.raises(RuntimeError, match="kv_len 9 outside the capacity 8"):
        K.decode_attention(x, x, x, x, x, *caches, torch.tensor([0]), None, 9, 0.125)


@needs_kernel
def test_kernel_errors_format_their_numbers():
    """Messages with numbers are formatted into one C string (check.h: a crash on one GCC 13 build otherwise)."""
    op = K._ops()
    with pytest.raises(RuntimeError, match="small_gemm: at most 16 rows"):
        op.small_gemm(torch.zeros(17, 8), torch.zeros(4, 8), None)
    if op.has_int4():
        q, s = torch.zeros(1, 8 * 48, dtype=torch.uint8), torch.zeros(1, 1, 16, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match=r"dequantize_int4: K \(48\) must be a multiple of the group size 32"):
            op.dequantize_int4(q, s, s, 32)


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_prefill_linear_through_fp32_gemm(bias, monkeypatch):
    """Many bf16 rows on a CPU without AMX: widened to fp32, one fp32 GEMM, rounded once (a bf16 GEMM's
    arithmetic), in weight blocks; under autograd it stays F.linear."""
    monkeypatch.setattr(K, "_bf16_gemm_is_slow", lambda: True)
    monkeypatch.setattr(K, "WIDE_BLOCK_BYTES", 256 * 4 * 200)  # several blocks of 256 rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 200, generator=g).bfloat16()  # 150 rows: beyond the prefill kernel's 128
    w = (torch.randn(700, 200, generator=g) / 200**0.5).bfloat16()
    b = torch.randn(700, generator=g).bfloat16() if bias else None
    calls = []
    real = K._bf16_linear_in_fp32
    monkeypatch.setattr(K, "_bf16_linear_in_fp32", lambda *a: calls.append(1) or real(*a))
    out = small_batch_linear(x, w, b)
    assert calls and out.dtype == torch.bfloat16 and out.shape == (3, 50, 700)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    # one rounding to bf16 (unit roundoff 2**-8) on top of fp32 accumulation error
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()
    calls.clear()
    small_batch_linear(x.requires_grad_(), w, b)
    assert not calls


needs_prefill_kernel = pytest.mark.skipif(
    not kernel_available() or not K._avx512_kernels(), reason="the prefill kernel needs AVX-512")


def _exact_linear(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@needs_prefill_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m, n, k", [(17, 37, 1000), (128, 64, 2100), (40, 700, 200), (23, 5, 16), (6, 9, 1)])
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.bfloat16)])
def test_prefill_gemm_matches_the_exact_product(m, n, k, bias, x_dtype, w_dtype):
    """Row and column tails (N not a multiple of 4, M of 6, K of 16), several K blocks (2100 > 1024), K = 1: fp32
    sums within fp32 rounding of the exact product; bf16 output rounded once."""
    x, w, b = _data(m, n, k, w_dtype, bias)
    x = x.to(x_dtype)
    out = K._ops().prefill_gemm(x, w, b)
    assert out.dtype == x_dtype and out.shape == (m, n)
    exact = _exact_linear(x, w, b)
    scale = (x.double().abs() @ w.double().abs().t()) + (0 if b is None else b.double().abs())
    tol = scale * (2**-8 if x_dtype == torch.bfloat16 else 1e-6) + 1e-7
    assert ((out.double() - exact).abs() <= tol).all()


@needs_prefill_kernel
def test_bf16_prefill_rows_use_the_prefill_kernel(monkeypatch):
    """bf16 weights at 17..128 rows (without AMX) go through prefill_gemm; 129 rows, fp32 weights and autograd
    do not; results equal the op's own."""
    monkeypatch.setattr(K, "_bf16_gemm_is_slow", lambda: True)
    calls = []
    real = K._ops()

    class Counting:
        def __getattr__(self, name):
            op = getattr(real, name)
            return (lambda *a: calls.append(name) or op(*a)) if name == "prefill_gemm" else op

    monkeypatch.setattr(K, "_ops", lambda: Counting())
    x, w, b = _data(2 * 60, 300, 512, torch.bfloat16, bias=True)
    x = x.bfloat16().reshape(2, 60, 512)
    y = small_batch_linear(x, w, b)
    assert calls == ["prefill_gemm"] and y.shape == (2, 60, 300)
    assert torch.equal(y, real.prefill_gemm(x.reshape(120, 512), w, b).reshape(2, 60, 300))
    calls.clear()
    small_batch_linear(torch.cat([x.reshape(120, 512), x[0, :9]]), w, b)  # 129 rows
    small_batch_linear(x.float(), w.float(), b.float())  # fp32: MKL
    small_batch_linear(x.float().requires_grad_(), w, b)  # autograd
    assert not calls
    monkeypatch.setattr(K, "_bf16_gemm_is_slow", lambda: False)  # AMX: oneDNN's bf16 GEMM for bf16 x ...
    small_batch_linear(x, w, b)
    assert not calls
    small_batch_linear(x.float(), w, b)  # ... but fp32 x with bf16 weight still avoids widening all of it
    assert calls == ["prefill_gemm"]


# ---- seeded dropout (LoRA training) ----------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_seeded_dropout_kernel_equals_the_torch_ops(dtype, monkeypatch):
    x = torch.randn(37, 2 * 301).to(dtype)[:, ::2]  # non-contiguous: the mask follows the logical order
    got = K.seeded_dropout(x, 0.1, (12345, 4_000_000_123))
    monkeypatch.setattr(K, "_ops", lambda: None)
    monkeypatch.setattr(K, "_DROPOUT_CHUNK", 1000)  # several chunks
    expected = K.seeded_dropout(x, 0.1, (12345, 4_000_000_123))
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, expected)
    kept = got != 0
    assert torch.equal(got[kept], (x.float() * (1 / 0.9)).to(dtype)[kept])


def test_seeded_dropout_rate_seeds_and_edges():
    x = torch.ones(1000, 1000)
    a = K.seeded_dropout(x, 0.1, (1, 2))
    dropped = float((a == 0).float().mean())
    assert abs(dropped - 0.1) < 0.002  # 1e6 draws: sd 3e-4
    assert torch.equal(a, K.seeded_dropout(x, 0.1, (1, 2)))  # a function of the seeds
    b = K.seeded_dropout(x, 0.1, (1, 3))
    assert not torch.equal(a == 0, b == 0)
    assert abs(float(((a == 0) & (b == 0)).float().mean()) - 0.01) < 0.001  # independent masks
    # neighbouring elements are not correlated (the hash mixes the index)
    rows = (a == 0).float()
    assert abs(float((rows[:, 1:] * rows[:, :-1]).mean()) - 0.01) < 0.001
    assert torch.equal(K.seeded_dropout(x, 0.0, (1, 2)), x)
    assert torch.equal(K.seeded_dropout(x, 1.0, (1, 2)), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        K.seeded_dropout(x, 1.5, (1, 2))


@needs_kernel
@pytest.mark.parametrize("n, k, r", [(202, 1024, 8), (37, 100, 5), (50, 70, 19), (3, 4096, 64)])
def test_dropout_linear_kernels_equal_dropout_then_matmul(n, k, r):
    """LoRA's down-projection with the dropout fused in, and its two gradients, equal the unfused ops (the same
    mask as seeded_dropout; fp32 sums in another order)."""
    g = torch.Generator().manual_seed(n + k + r)
    x, w, grad = torch.randn(n, k, generator=g), torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g)
    seeds = (123, 456)
    assert K.dropout_linear_applies(x, w) and not K.dropout_linear_applies(x.bfloat16(), w.bfloat16())
    dropped = K.seeded_dropout(x, 0.1, seeds)
    torch.testing.assert_close(K.dropout_linear(x, w, 0.1, seeds), dropped @ w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.dropout_linear_grad_input(grad, w, 0.1, seeds), K.seeded_dropout(grad @ w, 0.1, seeds),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.dropout_linear_grad_weight(grad, x, 0.1, seeds), grad.t() @ dropped,
                               rtol=1e-5, atol=1e-4)
    assert torch.equal(K.dropout_linear(x, w, 1.0, seeds), torch.zeros(n, r))


# ---- CPU memory pool ------------------------------------------------------------------------------------------
def _pool_stats() -> dict:
    return K.cpu_memory_pool_stats()


@needs_kernel
def test_memory_pool_reuses_freed_blocks_of_the_same_size():
    with K.cpu_memory_pool(threshold=64 << 10) as enabled:
        assert enabled and _pool_stats()["enabled"]
        K.cpu_memory_pool_stats(reset_peak=True)
        first = torch.empty(300_000)
        address = first.data_ptr()
        assert address % 64 == 0
        del first
        again = torch.empty(290_000)  # 4 KiB pages fewer: within 1/4 of the cached block, served from it
        assert again.data_ptr() == address
        larger = torch.empty(1_000_000)  # no cached block fits: a new one
        assert larger.data_ptr() != address
        small = torch.empty(1000)  # below the threshold: the previous allocator's
        stats = _pool_stats()
        assert stats["hits"] == 1 and stats["misses"] == 2
        assert stats["live_bytes"] == (300_000 * 4 + 4095) // 4096 * 4096 + 1_000_000 * 4 // 4096 * 4096 + 4096
        del again, larger, small
        assert _pool_stats()["live_bytes"] == 0


@needs_kernel
def test_memory_pool_off_restores_the_allocator_and_unmaps():
    with K.cpu_memory_pool(threshold=64 << 10):
        kept = torch.ones(500_000)
        freed = torch.ones(500_000)
        del freed
        assert _pool_stats()["cached_bytes"] > 0
    stats = _pool_stats()
    assert not stats["enabled"] and stats["cached_bytes"] == 0
    mapped = stats["mapped_bytes"]
    outside = torch.empty(500_000)  # the previous allocator again
    assert _pool_stats()["mapped_bytes"] == mapped
    assert float(kept.sum()) == 500_000.0  # blocks handed out stay valid after the pool is off
    del kept  # ...and are unmapped when freed, not cached
    assert _pool_stats()["mapped_bytes"] == mapped - 2_000_000 // 4096 * 4096 - 4096
    assert _pool_stats()["cached_bytes"] == 0
    del outside


@needs_kernel
def test_memory_pool_nested_keeps_the_outer_pool():
    with K.cpu_memory_pool():
        with K.cpu_memory_pool() as inner:
            assert inner
        assert _pool_stats()["enabled"]
    assert not _pool_stats()["enabled"]


@needs_kernel
def test_memory_pool_caps_what_it_keeps():
    with K.cpu_memory_pool(threshold=64 << 10):
        K.cpu_memory_pool_stats(reset_peak=True)
        for i in range(60):  # 60 distinct sizes of ~2 MiB, each freed before the next: nothing to reuse
            torch.empty((1 << 19) + 1024 * i)
        stats = _pool_stats()
        assert stats["misses"] == 60
        assert stats["cached_bytes"] <= max(64 << 20, 2 * stats["peak_live_bytes"])
        assert stats["mapped_bytes"] == stats["cached_bytes"] + stats["live_bytes"]


@needs_kernel
def test_memory_pool_training_step_is_identical_and_profilable():
    """Convolution (oneDNN's raw allocations), GEMMs, autograd: the same bits with and without the pool; the
    profiler still sees the pool's allocations."""

    def step() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, stride=7), torch.nn.Flatten(1),
                                    torch.nn.Linear(16 * 16 * 16, 512), torch.nn.GELU(), torch.nn.Linear(512, 10))
        x = torch.randn(8, 3, 112, 112)
        for _ in range(2):
            model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = step()
    with K.cpu_memory_pool(threshold=64 << 10):
        K.cpu_memory_pool_stats(reset_peak=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            got = step()
        assert _pool_stats()["hits"] > 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert sum(e.cpu_memory_usage for e in prof.key_averages() if e.cpu_memory_usage > 0) > 0


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_memory_pool_survives_fork():
    with K.cpu_memory_pool(threshold=64 << 10):
        parent = torch.ones(300_000)
        pid = os.fork()
        if pid == 0:  # the child allocates and frees through its copy of the pool, then exits at once
            torch.set_num_threads(1)  # libgomp's thread pool does not survive fork
            ok = float((torch.ones(400_000) + parent[:400_000].sum()).sum()) > 0
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung allocating through the pool")
        assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0
        del parent
