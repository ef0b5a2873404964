"""The fused decoding paths of the text decoder (`MistralModel.fused_decode` for all layers in one op,
`MistralDecoderLayer.fused_decode` for one; kernels/decode_layer.cpp):
bit-identical to running the layer's modules, and only taken where it reproduces them."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from reference import left_pad, tiny_config_dict

from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, kernels
from idefics2.quantize import quantize_model
from idefics2.text import MistralDecoderLayer, MistralModel, decode_layer_weights, decode_stack_weights

pytestmark = pytest.mark.skipif(
    os.environ.get("IDEFICS2_DISABLE_KERNELS", "") not in ("", "0") or not kernels.kernel_available(),
    reason="compiled kernels unavailable",
)


def _model(dtype, quant):
    config = tiny_config_dict(sliding_window=8, text_heads=4, text_kv_heads=2)  # window < prompt + new tokens
    config["text_config"].update(hidden_size=128, intermediate_size=256)  # int4 needs in_features % 128 == 0
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config)).to(dtype).eval()
    if quant:
        quantize_model(model, quant)
    return model


def _generate(model, mode: str, monkeypatch):
    """mode "stack": all layers in one op where it applies (the default); "layers": one op per layer; "modules":
    the layers' modules. Returns the output and whether each stack / layer attempt was fused."""
    calls = {"stack": [], "layers": []}
    real_stack, real_layer = MistralModel.fused_decode, MistralDecoderLayer.fused_decode

    def tracked(real, kind, allowed):
        def run(self, *args):
            out = real(self, *args) if allowed else None
            calls[kind].append(out is not None)
            return out
        return run

    monkeypatch.setattr(MistralModel, "fused_decode", tracked(real_stack, "stack", mode == "stack"))
    monkeypatch.setattr(MistralDecoderLayer, "fused_decode", tracked(real_layer, "layers", mode != "modules"))
    g = torch.Generator().manual_seed(1)
    ids, mask = left_pad([torch.randint(3, 100, (n,), generator=g) for n in (11, 6, 9)])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                         return_dict_in_generate=True, output_scores=True, bad_words_ids=None)
    monkeypatch.setattr(MistralModel, "fused_decode", real_stack)
    monkeypatch.setattr(MistralDecoderLayer, "fused_decode", real_layer)
    return out, calls


@pytest.mark.parametrize("dtype, quant", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8"),
                                          (torch.float32, "int8"), (torch.bfloat16, "int4")])
def test_fused_decode_is_bit_identical_to_the_modules(dtype, quant, monkeypatch):
    if quant == "int4" and not kernels.int4_kernel_available():
        pytest.skip("int4 kernel needs AVX512-VNNI")
    model = _model(dtype, quant)
    stack, stack_calls = _generate(model, "stack", monkeypatch)
    layers, layer_calls = _generate(model, "layers", monkeypatch)
    modules, _ = _generate(model, "modules", monkeypatch)
    # every decoding step took the one-op stack; with it off, every layer of every step its own op
    assert len(stack_calls["stack"]) == 9 and all(stack_calls["stack"]) and not stack_calls["layers"]
    assert len(layer_calls["layers"]) == 9 * len(model.model.text_model.layers) and all(layer_calls["layers"])
    for out in (stack, layers):
        assert torch.equal(out.sequences, modules.sequences)
        for a, b in zip(out.scores, modules.scores):
            assert torch.equal(a, b)


def test_layers_with_hooks_or_other_modules_run_their_modules(monkeypatch):
    model = _model(torch.float32, None)
    reference, _ = _generate(model, "modules", monkeypatch)
    seen = []
    hooked = model.model.text_model.layers[1].mlp.down_proj
    handle = hooked.register_forward_hook(lambda module, args, out: seen.append(1))
    assert decode_layer_weights(model.model.text_model.layers[0], torch.float32) is not None
    assert decode_layer_weights(model.model.text_model.layers[1], torch.float32) is None
    assert decode_stack_weights(model.model.text_model.layers, torch.float32) is None
    out, calls = _generate(model, "stack", monkeypatch)
    handle.remove()
    assert calls["stack"] and not any(calls["stack"])  # not the stack: layer by layer
    assert calls["layers"].count(True) == calls["layers"].count(False)  # layer 0 fused, layer 1 its modules
    assert len(seen) == 1 + 9  # prefill + 9 decoding steps
    assert torch.equal(out.sequences, reference.sequences)
    # a different module (an adapter, say) in place of a projection: not the layer the op reproduces
    model.model.text_model.layers[0].self_attn.o_proj = torch.nn.Linear(128, 128, bias=False)
    assert decode_layer_weights(model.model.text_model.layers[0], torch.float32) is None
    # weights in another dtype than the activations: the modules decide (they cast or refuse)
    assert decode_layer_weights(model.model.text_model.layers[1], torch.bfloat16) is None


def test_cache_layers_out_of_step_are_decoded_layer_by_layer():
    from idefics2.cache import KVCache

    cache = KVCache(3, 2, 1, 8, 16, torch.float32, "cpu")
    keys, values, positions, kv_len = cache.decode_slots()
    assert len(keys) == 3 and positions.tolist() == [0, 0] and kv_len == 1 and cache.lengths == [1, 1, 1]
    cache.decode_slot(0)  # layer 0 one token ahead
    assert cache.decode_slots() is None and cache.lengths == [2, 1, 1]  # nothing reserved


def test_gated_mlp_training_path_is_bit_identical_to_the_plain_expression():
    """In training, silu(gate) * up is not stored for down_proj but recomputed in backward from gate and up:
    output and every gradient are bit-identical to the plain expression."""
    from idefics2.layers import GatedMLP

    torch.manual_seed(0)
    mlp = GatedMLP(32, 96, 32, "silu")
    x = torch.randn(2, 5, 32, requires_grad=True)
    grad = torch.randn(2, 5, 32)

    def run(forward):
        for p in (*mlp.parameters(), x):
            p.grad = None
        out = forward(x)
        out.backward(grad)
        return out, [p.grad.clone() for p in (*mlp.parameters(), x)]

    out, grads = run(mlp)
    ref_out, ref_grads = run(lambda v: mlp.down_proj(F.silu(mlp.gate_proj(v)) * mlp.up_proj(v)))
    assert torch.equal(out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gated_mlp_training_frees_what_it_does_not_keep(checkpointing):
    """After the forward, silu(gate) * up is gone (recomputed in backward) while gate stays; under gradient
    checkpointing (its saved-tensor hooks own what is kept) gate is gone too, and backward works."""
    import gc
    import weakref

    from idefics2.layers import GatedMLP

    torch.manual_seed(0)
    mlp = GatedMLP(32, 96, 32, "silu")
    refs = {}
    mlp.gate_proj.register_forward_hook(lambda m, a, out: refs.__setitem__("gate", weakref.ref(out)))
    mlp.down_proj.register_forward_pre_hook(lambda m, a: refs.__setitem__("hidden", weakref.ref(a[0])))
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(mlp, x, use_reentrant=False) if checkpointing else mlp(x)
    gc.collect()
    assert refs["hidden"]() is None
    assert (refs["gate"]() is None) == checkpointing
    out.sum().backward()
    assert x.grad is not None and mlp.down_proj.weight.grad is not None
