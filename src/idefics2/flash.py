"""Optional flash-attn 2 backend (CUDA only, fp16/bf16).

flash-attn takes no arbitrary mask, so masked calls (padding, sliding window in effect) go through torch's
sdpa instead; unmasked and plain causal calls use `flash_attn_func`.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def flash_attention_available() -> str | None:
    """None when usable, else the reason it is not."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install flash-attn); use 'sdpa' instead"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA GPU and none is available; use 'sdpa' instead"
    return None


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    *,
    is_causal: bool = False,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Same contract as `layers.attention`: [B, H, T, D] inputs, [B, Q, H, D] output."""
    if mask is not None or query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        groups = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None,
            scale=scale, enable_gqa=groups > 1,
        )
        return out.transpose(1, 2)
    from flash_attn import flash_attn_func

    # flash-attn wants [B, T, H, D] and handles grouped kv heads itself.
    out = flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        dropout_p=dropout, softmax_scale=scale, causal=is_causal,
    )
    return out
