"""SigLIP-style vision tower with NaViT-style variable resolution (`model.vision_model.*`)."""

from __future__ import annotations

import torch
from torch import nn

from .config import Idefics2VisionConfig
from .kernels import small_batch_linear
from .layers import Linear, activation, add_residual, attention, gelu_tanh_, key_padding_mask, overwritable


def patch_position_ids(patch_mask: torch.Tensor, num_patches_per_side: int) -> torch.Tensor:
    """Position ids [I, h*w] of the valid patches, by fractional bucketing of their row/column.

    Each image's valid extent (rows counted down its first column, columns along its first row) is mapped onto
    the `num_patches_per_side`² learned grid. The float32 arithmetic is the reference's (v5.24), so buckets
    agree exactly, including the few sizes (n = 25, 49, 50, 55) where float32 rounding differs from floor().
    Padded patches get id 0.
    """
    num_images, rows, cols = patch_mask.shape
    device = patch_mask.device
    side = num_patches_per_side
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)
    step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)
    frac_h = torch.arange(rows, device=device, dtype=torch.float32)[None, :] * step_h[:, None]
    frac_w = torch.arange(cols, device=device, dtype=torch.float32)[None, :] * step_w[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * side + bucket_w[:, None, :]).reshape(num_images, -1)
    return torch.where(patch_mask.reshape(num_images, -1), ids, torch.zeros_like(ids))


class Idefics2VisionEmbeddings(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.num_patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        # Conv with stride == kernel drops the partial patches at the right/bottom border, as the mask does.
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [I, h*w, D], row-major
        positions = patch_position_ids(patch_mask, self.num_patches_per_side)
        return patches + self.position_embedding(positions)


class Idefics2VisionAttention(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        d = config.hidden_size
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out, _ = attention(
            q, k, v, mask, self.scale, self.attn_implementation, dropout=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.reshape(batch, length, -1))


class Idefics2VisionMLP(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.act_inplace = activation(config.hidden_act, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.fc1
        if not overwritable(fc1):
            return self.fc2(self.act(fc1(x)))
        if self.act_inplace is gelu_tanh_ and type(fc1) is Linear and fc1.bias is not None and x.dtype == torch.float32:
            # fp32: fc1's bias added by the GELU kernel's pass (mm then + bias rounds as addmm does), which
            # saves addmm's copy of the bias into the output
            return self.fc2(gelu_tanh_(small_batch_linear(x, fc1.weight), fc1.bias))
        return self.fc2(self.act_inplace(fc1(x)))


class Idefics2EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block, bidirectional attention over the valid patches."""

    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Idefics2VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Idefics2VisionMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = add_residual(x, self.self_attn(self.layer_norm1(x), mask), self.self_attn, self.self_attn.out_proj)
        return add_residual(x, self.mlp(self.layer_norm2(x)), self.mlp, self.mlp.fc2)


class Idefics2Encoder(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Idefics2EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


class Idefics2VisionTransformer(nn.Module):
    """pixel_values [I, 3, H, W] + patch mask [I, H//14, W//14] -> patch features [I, h*w, 1152]."""

    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Idefics2VisionEmbeddings(config)
        self.encoder = Idefics2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        if patch_mask is None:
            p = self.config.patch_size
            patch_mask = torch.ones(
                pixel_values.shape[0], pixel_values.shape[2] // p, pixel_values.shape[3] // p,
                dtype=torch.bool, device=pixel_values.device,
            )
        patch_mask = patch_mask.bool()
        hidden = self.embeddings(pixel_values, patch_mask)
        mask = key_padding_mask(patch_mask.reshape(patch_mask.shape[0], -1))
        hidden = self.encoder(hidden, mask)
        return self.post_layernorm(hidden)
