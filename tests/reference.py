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


def make_prompt(generator: torch.Generator, config: dict, n_images: int, text_len: int) -> torch.Tensor:
    """Random text with `n_images` blocks `<fake> <image>*n_latents <fake>` spread through it."""
    vocab = config["text_config"]["vocab_size"]
    image_id, fake_id = config["image_token_id"], config["image_token_id"] - 1
    n_latents = config["perceiver_config"]["resampler_n_latents"]
    pieces = [torch.tensor([1])]  # bos
    for _ in range(n_images):
        pieces.append(torch.randint(3, vocab - 2, (int(torch.randint(1, 4, (1,), generator=generator)),),
                                    generator=generator))
        pieces.append(torch.tensor([fake_id] + [image_id] * n_latents + [fake_id]))
    pieces.append(torch.randint(3, vocab - 2, (text_len,), generator=generator))
    return torch.cat(pieces)


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def pad_images(
    generator: torch.Generator, sizes_per_sample: list[list[tuple[int, int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of the given (h, w), zero-padded like the processor into (B, N, 3, H, W) + pixel mask."""
    batch = len(sizes_per_sample)
    n_max = max(1, max(len(s) for s in sizes_per_sample))
    all_sizes = [hw for s in sizes_per_sample for hw in s] or [(28, 28)]
    h_max, w_max = max(h for h, _ in all_sizes), max(w for _, w in all_sizes)
    pixels = torch.zeros(batch, n_max, 3, h_max, w_max)
    mask = torch.zeros(batch, n_max, h_max, w_max, dtype=torch.long)
    for b, sizes in enumerate(sizes_per_sample):
        for i, (h, w) in enumerate(sizes):
            pixels[b, i, :, :h, :w] = torch.rand(3, h, w, generator=generator) * 2 - 1
            mask[b, i, :h, :w] = 1
    return pixels, mask
