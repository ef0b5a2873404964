"""Builders shared by the parity tests: tiny random checkpoints made and saved by transformers (the reference)."""

from __future__ import annotations

import copy

import torch


def tiny_config_dict(
    *,
    vision_heads: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    perceiver_heads: int = 4,
    perceiver_kv_heads: int = 2,
    perceiver_depth: int = 2,
    n_latents: int = 4,
    sliding_window: int | None = 4096,
    vocab_size: int = 120,
    image_size: int = 56,
    patch_size: int = 14,
) -> dict:
    """A small but complete Idefics2 config: every field the model uses is set explicitly."""
    return {
        "model_type": "idefics2",
        "image_token_id": vocab_size - 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": vision_heads, "num_channels": 3, "image_size": image_size,
            "patch_size": patch_size, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        },
        "perceiver_config": {
            "hidden_act": "silu", "hidden_size": 64, "rms_norm_eps": 1e-6, "resampler_n_latents": n_latents,
            "resampler_depth": perceiver_depth, "resampler_n_heads": perceiver_heads,
            "resampler_head_dim": 8, "num_key_value_heads": perceiver_kv_heads,
        },
        "text_config": {
            "model_type": "mistral", "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": text_heads, "num_key_value_heads": text_kv_heads,
            "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2, "sliding_window": sliding_window, "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        },
    }


def reference_model(config_dict: dict, seed: int = 0, dtype=torch.float32):
    """A transformers Idefics2ForConditionalGeneration with random (non-trivial) weights."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    config = Idefics2Config(**copy.deepcopy(config_dict))
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights and latents start at exactly 1 / 0; perturb them so a wrong mapping shows.
            if p.dim() == 1 or name.endswith("latents"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()
