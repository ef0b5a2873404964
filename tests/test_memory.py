"""Memory estimates: exact for weights and KV cache, in the right range for activations."""

import torch

from idefics2.memory import estimate, weight_bytes
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.presets import preset_config
from idefics2.quantize import quantize_model


def test_weights_and_kv_cache_are_exact():
    config = preset_config("tiny")
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(config).to(torch.bfloat16)
    actual = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(config, torch.bfloat16) == actual
    quantize_model(model, "int8")  # lm_head too, by default
    quantized = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                    if t is not model.model.text_model.rotary_emb.inv_freq)
    assert weight_bytes(config, torch.bfloat16, "int8") == quantized
    float_head = Idefics2ForConditionalGeneration(config).to(torch.bfloat16)
    quantize_model(float_head, "int4", lm_head=False)
    quantized = sum(t.numel() * t.element_size() for t in [*float_head.parameters(), *float_head.buffers()]
                    if t is not float_head.model.text_model.rotary_emb.inv_freq)
    assert weight_bytes(config, torch.bfloat16, "int4", quantize_lm_head=False) == quantized
    result = estimate(config, torch.bfloat16, batch=3, max_new_tokens=20, image_splitting=False)
    cache = model.model.text_model.new_cache(3, result.prompt_tokens + 20, torch.bfloat16, "cpu")
    assert result.kv_cache == sum(k.numel() * k.element_size() for k in cache.keys + cache.values)


def test_8b_figures():
    result = estimate(preset_config("8b-shapes"), torch.bfloat16)
    assert abs(result.weights / 2**30 - 15.65) < 0.05  # 8,402,768,112 parameters x 2 bytes
    assert result.prompt_tokens == 5 * 64 + 6 + 50
    # int4 text layers (7.0B of the 8.4B parameters) at ~0.53 bytes each; the rest stays bf16.
    assert 0.38 < estimate(preset_config("8b-shapes"), torch.bfloat16, "int4").weights / result.weights < 0.42
