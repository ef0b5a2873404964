"""Architectures for random-weight checkpoints: try everything without downloading the 8B weights.

`tiny` is for tests and the demo (a few MB), `medium` (~420M parameters) keeps the 8b's shape ratios
(wide GQA decoder, 64 latents, 14 px patches, 980 px grid) for benchmarks, `8b-shapes` is the real
architecture (for meta-device and memory checks).
"""

from __future__ import annotations

import os

import torch

from .config import Idefics2Config

PRESETS: dict[str, dict] = {
    "tiny": {
        "image_token_id": 32001,
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 980, "patch_size": 14},
        "perceiver_config": {"hidden_size": 128, "resampler_n_latents": 64, "resampler_depth": 2,
                             "resampler_n_heads": 4, "resampler_head_dim": 32, "num_key_value_heads": 2,
                             "rms_norm_eps": 1e-6},
        "text_config": {"vocab_size": 32003, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                        "rms_norm_eps": 1e-5, "pad_token_id": 0, "sliding_window": 4096},
    },
    "medium": {
        "image_token_id": 32001,
        "vision_config": {"hidden_size": 384, "intermediate_size": 1408, "num_hidden_layers": 12,
                          "num_attention_heads": 6, "image_size": 980, "patch_size": 14},
        "perceiver_config": {"hidden_size": 1024, "resampler_n_latents": 64, "resampler_depth": 3,
                             "resampler_n_heads": 16, "resampler_head_dim": 96, "num_key_value_heads": 4,
                             "rms_norm_eps": 1e-6},
        "text_config": {"vocab_size": 32003, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 20,
                        "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                        "rms_norm_eps": 1e-5, "pad_token_id": 0, "sliding_window": 4096},
    },
    "8b-shapes": {},  # the defaults are the idefics2-8b architecture
}


def preset_config(name: str) -> Idefics2Config:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return Idefics2Config.from_dict(PRESETS[name])


def write_random_checkpoint(
    name: str, directory: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> str:
    """Save a randomly initialised model of preset `name` to `directory` in the published layout.
    `device="cuda"` initialises on the GPU (seconds instead of minutes for `8b-shapes`; other random values)."""
    from .generation import GenerationConfig
    from .modeling import Idefics2ForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Idefics2ForConditionalGeneration(preset_config(name))
    model = model.to(dtype).to("cpu")
    model.generation_config = GenerationConfig(  # the published idefics2-8b generation_config.json
        bad_words_ids=[[32000], [32001]], bos_token_id=1, eos_token_id=[2, 32002], pad_token_id=0
    )
    model.save_pretrained(directory)
    return os.fspath(directory)
