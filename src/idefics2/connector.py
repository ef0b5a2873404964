"""Connector (`model.connector.*`): modality projection MLP, then a perceiver resampler to 64 latents."""

from __future__ import annotations

import torch
from torch import nn

from .config import Idefics2Config, Idefics2PerceiverConfig
from .layers import GatedMLP, Linear, RMSNorm, add_residual, attention, key_padding_mask


class Idefics2PerceiverAttention(nn.Module):
    """Latents attend to [context; latents] (context first), GQA, non-causal, no positions."""

    def __init__(self, config: Idefics2PerceiverConfig) -> None:
        super().__init__()
        self.num_heads = config.resampler_n_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resampler_head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        d = config.hidden_size
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, n_latents, _ = latents.shape
        keys_in = torch.cat([context, latents], dim=1)
        kv_len = keys_in.shape[1]
        q = self.q_proj(latents).view(batch, n_latents, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(keys_in).view(batch, kv_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(keys_in).view(batch, kv_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out, _ = attention(
            q, k, v, mask, self.scale, self.attn_implementation, dropout=self.dropout if self.training else 0.0
        )
        return self.o_proj(out.reshape(batch, n_latents, -1))


class Idefics2PerceiverLayer(nn.Module):
    def __init__(self, config: Idefics2PerceiverConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_latents_norm = RMSNorm(d, eps)
        self.input_context_norm = RMSNorm(d, eps)
        self.self_attn = Idefics2PerceiverAttention(config)
        self.post_attention_layernorm = RMSNorm(d, eps)
        # The MLP width is fixed at 4x (not a config field).
        self.mlp = GatedMLP(d, 4 * d, d, config.hidden_act)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), mask)
        latents = add_residual(latents, attended, self.self_attn, self.self_attn.o_proj)
        return add_residual(latents, self.mlp(self.post_attention_layernorm(latents)), self.mlp, self.mlp.down_proj)


class Idefics2PerceiverResampler(nn.Module):
    def __init__(self, config: Idefics2PerceiverConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.ones(config.resampler_n_latents, config.hidden_size))
        self.layers = nn.ModuleList(Idefics2PerceiverLayer(config) for _ in range(config.resampler_depth))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        num_images = context.shape[0]
        latents = self.latents.unsqueeze(0).expand(num_images, -1, -1)
        # Keys are [context; latents]; the latents are always valid keys.
        latent_valid = torch.ones(num_images, latents.shape[1], dtype=torch.bool, device=context.device)
        mask = key_padding_mask(torch.cat([context_mask.bool(), latent_valid], dim=1))
        for layer in self.layers:
            latents = layer(latents, context, mask)  # every layer sees the same (projected) context
        return self.norm(latents)


class Idefics2Connector(nn.Module):
    """Patch features [I, L, D_vision] + patch mask [I, L] -> image features [I, n_latents, D_text]."""

    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        text = config.text_config
        self.modality_projection = GatedMLP(
            config.vision_config.hidden_size, text.intermediate_size, text.hidden_size, text.hidden_act
        )
        self.perceiver_resampler = Idefics2PerceiverResampler(config.perceiver_config)

    def forward(self, image_hidden_states: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        return self.perceiver_resampler(self.modality_projection(image_hidden_states), patch_mask)
