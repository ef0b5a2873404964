"""Memory estimate for running a checkpoint: weights, KV cache and peak activations (`idefics2 estimate-memory`).

Weights and the KV cache are exact (counted from the architecture on the meta device); activations are an
estimate of the largest live tensors during the vision pass and the text prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Idefics2Config

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int
    prompt_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def table(self) -> str:
        gib = 2**30
        rows = [("weights", self.weights), ("KV cache", self.kv_cache), ("activations (peak)", self.activations),
                ("total", self.total)]
        return "\n".join(f"{name:20}{value / gib:>10.2f} GiB" for name, value in rows)


def weight_bytes(
    config: Idefics2Config, dtype: torch.dtype, quantize: str | None = None, group_size: int = 64,
    quantize_lm_head: bool | str = True,
) -> int:
    """Bytes of the parameters as loaded; `quantize` ("int8", "int4", "nf4") applies to the text decoder layers,
    and idefics2's int8 / int4 also to an untied `lm_head` (`quantize_lm_head` as in `from_pretrained`)."""
    from .modeling import Idefics2ForConditionalGeneration, empty_weights
    from .quantize import head_method, int4_rows

    with empty_weights():
        model = Idefics2ForConditionalGeneration(config)
    head = (head_method(quantize, quantize_lm_head) if quantize in ("int8", "int4") and not config.tie_word_embeddings
            else None)
    total = 0
    for name, param in model.named_parameters():
        n = param.numel()
        is_text_linear = name.startswith("model.text_model.layers.") and param.dim() == 2
        method = head if name == "lm_head.weight" else quantize if is_text_linear else None
        if method:
            out_features, in_features = param.shape
            if method == "int8":
                total += n + 2 * out_features  # int8 weight + bf16 scale per row
            elif method == "int4":  # rows padded to whole blocks; two nibbles a byte + bf16 scale and zero per group
                rows = int4_rows(out_features)
                total += rows * in_features // 2 + 4 * (rows * in_features // group_size)
            else:  # bitsandbytes nf4: 4-bit weight + one absmax per 64 values (double quant ignored)
                total += n // 2 + 4 * (n // 64)
        else:
            total += n * BYTES[dtype]
    return total


def estimate(config: Idefics2Config, dtype: torch.dtype = torch.bfloat16, quantize: str | None = None,
             image_splitting: bool = True, images: int = 1, text_tokens: int = 50, batch: int = 1,
             max_new_tokens: int = 256, image_side: int | None = None) -> MemoryEstimate:
    vision, text = config.vision_config, config.text_config
    sub_images = images * (5 if image_splitting else 1)
    image_tokens = sub_images * config.image_seq_len + images * (6 if image_splitting else 2)
    prompt = image_tokens + text_tokens
    bytes_per = BYTES[dtype]
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * (prompt + max_new_tokens)
    kv *= batch * bytes_per
    side = image_side or vision.image_size
    patches = (side // vision.patch_size) ** 2
    # Vision pass: residual + normed + q/k/v/attention output + MLP hidden, for every sub-image of the batch.
    vision_act = batch * sub_images * patches * (6 * vision.hidden_size + vision.intermediate_size) * bytes_per
    # Connector: the projection MLP's hidden over all patches dominates.
    connector_act = batch * sub_images * patches * (2 * text.intermediate_size + text.hidden_size) * bytes_per
    text_act = batch * prompt * (6 * text.hidden_size + 2 * text.intermediate_size) * bytes_per
    return MemoryEstimate(weight_bytes(config, dtype, quantize), kv, max(vision_act, connector_act, text_act),
                          prompt)
