"""Building blocks shared by the vision tower, the connector and the text decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import small_batch_linear, small_batch_linears

_ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def gelu_tanh_(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x = gelu(x + bias, approximate="tanh") in place: the compiled kernel where it applies (4-5x faster than
    torch's tanh GELU, same function to a few ulp), torch's ops elsewhere."""
    fused = kernels.gelu_tanh_(x, bias)
    if fused is not None:
        return fused
    if bias is not None:
        x.add_(bias)
    return torch.ops.aten.gelu_(x, approximate="tanh")


# The same functions overwriting their input, for `overwritable` outputs (bit-identical results, except the
# tanh GELU's kernel: a few ulp, see `gelu_tanh_`).
_INPLACE_ACTIVATIONS = {
    "silu": lambda x: F.silu(x, inplace=True),
    "relu": lambda x: F.relu(x, inplace=True),
    "gelu": lambda x: torch.ops.aten.gelu_(x),
    "gelu_pytorch_tanh": gelu_tanh_,
    "gelu_new": gelu_tanh_,
}


def activation(name: str, inplace: bool = False):
    return (_INPLACE_ACTIVATIONS if inplace else _ACTIVATIONS)[name]


def overwritable(*producers: nn.Module) -> bool:
    """Whether the outputs of `producers` may be overwritten in place: autograd is off (nothing records them) and
    no forward hook, theirs or global, could have kept a reference. Inference then reuses an activation instead
    of allocating (and page-faulting in) a fresh one per op: 15% of the vision tower's time at batch 8."""
    return (not torch.is_grad_enabled() and not getattr(nn.modules.module, "_global_forward_hooks", None)
            and not any(m._forward_hooks for m in producers))


def add_residual(x: torch.Tensor, update: torch.Tensor, *producers: nn.Module) -> torch.Tensor:
    """x + update, written into `update` where it is `overwritable(*producers)` (addition commutes: the same
    bits) and shares no memory with x."""
    if (update.shape == x.shape and update.dtype == x.dtype and update.is_contiguous() and overwritable(*producers)
            and update.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()):
        return update.add_(x)
    return x + update


class RMSNorm(nn.Module):
    """RMSNorm as the checkpoints were trained with it: normalise in float32, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = kernels.rms_norm(x, self.weight, self.eps)  # decoding: one op instead of eight
        if fused is not None:
            return fused
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


class Linear(nn.Linear):
    """nn.Linear whose small-batch calls (decoding: <= 16 rows, no autograd) go through the streaming kernel
    of `idefics2.kernels`, which reads the weight once at close to memory bandwidth; everything else, and
    every machine where the kernel cannot be built, is exactly F.linear. Same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return small_batch_linear(x, self.weight, self.bias)


def parallel_linears(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """[linear(x) for linear in linears]; layers of one kind without hooks share one kernel call where the
    kind has one (q/k/v, gate/up): plain bias-free `Linear`s, int8 `QuantizedLinear`s (its `parallel_forward`).
    Anything else (adapters, other quantized layers, hooks) is called module by module."""
    kind = type(linears[0])
    if all(type(m) is kind and not m._forward_hooks and not m._forward_pre_hooks for m in linears):
        if kind is Linear and all(m.bias is None for m in linears):
            return small_batch_linears(x, [m.weight for m in linears])
        parallel_forward = getattr(kind, "parallel_forward", None)
        outputs = parallel_forward(x, linears) if parallel_forward is not None else None
        if outputs is not None:
            return outputs
    return [m(x) for m in linears]


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)); no biases (connector and Mistral)."""

    def __init__(self, hidden_size: int, intermediate_size: int, output_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, output_size, bias=False)
        self.act = activation(hidden_act)
        self.act_inplace = activation(hidden_act, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = parallel_linears(x, self.gate_proj, self.up_proj)
        if (self.act is F.silu and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
                and not _saved_tensors_managed()):
            return _down_of_swiglu(self.down_proj, gate, up)
        if overwritable(self.gate_proj, self.up_proj) and gate.shape == up.shape and gate.dtype == up.dtype:
            fused = kernels.silu_mul_(gate, up) if self.act is F.silu else None  # one pass instead of two
            return self.down_proj(fused if fused is not None else self.act_inplace(gate).mul_(up))
        return self.down_proj(self.act(gate) * up)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only (torch's ops also keep silu(gate)); the same forward bits and
    the same gradient ops (aten.silu_backward), so training is bit-identical to the unfused expression."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _saved_tensors_managed() -> bool:
    """Whether saved-tensor hooks are active (gradient checkpointing, offloading to the CPU): they decide what
    is kept, and their saved tensors may be unpacked only once, so `_down_of_swiglu` leaves them alone."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):  # a torch without this query: assume they are
        return True


def _down_of_swiglu(down_proj: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """down_proj(silu(gate) * up) for training: whatever down_proj saves of its input (its weight gradient's
    operand, a LoRA adapter's input) is stored as a note to recompute it from gate and up, which `_SwiGLU`
    keeps anyway. Of the MLP's four intermediate-sized activations two are kept instead of four: the largest
    share of a decoder layer's training memory."""
    hidden = _SwiGLU.apply(gate, up)
    # The hooks live as long as the graph: they must not hold `hidden`, its storage, gate or up (which, under
    # gradient checkpointing, are dropped and recomputed), only the address and the _SwiGLU node.
    address, dtype, node = hidden.untyped_storage().data_ptr(), hidden.dtype, hidden.grad_fn

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() == address and t.dtype == dtype:
            return (_RECOMPUTE, node, t.shape, t.stride(), t.storage_offset())
        return t

    def unpack(packed):
        if isinstance(packed, tuple) and packed[0] is _RECOMPUTE:
            gate_, up_ = packed[1].saved_tensors  # down_proj's backward runs before the node's own
            with torch.no_grad():
                return (F.silu(gate_) * up_).as_strided(packed[2], packed[3], packed[4])
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return down_proj(hidden)


_RECOMPUTE = object()  # marks a saved tensor that `_down_of_swiglu` recomputes


# torch < 2.5 returns NaN for query rows whose keys are all masked (newer versions return zeros) and has no
# `enable_gqa` in sdpa.
_TORCH_GE_2_5 = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    implementation: str,
    *,
    is_causal: bool = False,
    dropout: float = 0.0,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention with grouped key/value heads.

    query [B, Hq, Q, D], key/value [B, Hkv, K, D] with Hq a multiple of Hkv. `mask` is boolean, True where a
    query may attend a key, broadcastable to [B, Hq, Q, K]; `is_causal` (only with mask=None) asks for a plain
    causal mask. Returns the output as [B, Q, Hq, D] and, with `return_weights`, the attention probabilities
    (computed the eager way, since sdpa cannot return them).
    """
    groups = query.shape[1] // key.shape[1]
    if implementation == "eager" or return_weights:
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, key.transpose(2, 3)) * scale
        if is_causal and mask is None:
            q_len, k_len = scores.shape[-2:]
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if dropout:
            weights = F.dropout(weights, p=dropout, training=True)
        out = torch.matmul(weights, value)
        return out.transpose(1, 2), (weights if return_weights else None)

    if implementation == "flash_attention_2":
        from .flash import flash_attention

        return flash_attention(query, key, value, mask, scale, is_causal=is_causal, dropout=dropout), None

    extra = {}
    if not _TORCH_GE_2_5:
        if mask is not None:
            mask = mask | ~mask.any(-1, keepdim=True)
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    elif groups > 1:
        extra["enable_gqa"] = True
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None, scale=scale,
        **extra,
    )
    return out.transpose(1, 2), None


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """[B, K] validity -> a boolean [B, 1, 1, K] attention mask, or None when every key is valid."""
    valid = valid.bool()
    if bool(valid.all()):
        return None
    return valid[:, None, None, :]
