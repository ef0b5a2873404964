"""Weight-only int8 / int4 quantization: accuracy, checkpoint round trip, and what stays in float."""

import pytest
import torch
from reference import make_prompt, reference_model, tiny_config_dict

from idefics2 import Idefics2ForConditionalGeneration
from idefics2.quantize import QuantizedLinear, quantize_model

CONFIG = tiny_config_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("q")
    reference_model(CONFIG, seed=2).save_pretrained(path)
    return path


@pytest.mark.parametrize("bits, group", [(8, 64), (4, 32), (4, 64)])
def test_quantized_linear_matches_its_dequantized_weight(bits, group):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=False)
    q = QuantizedLinear.from_linear(linear, bits, group)
    x = torch.randn(5, 128)
    exact = x @ q.dequantize().t()
    assert torch.allclose(q(x), exact, rtol=0.02, atol=0.02)  # bf16 activations
    error = (q.dequantize() - linear.weight).abs().max() / linear.weight.abs().max()
    assert error < (0.01 if bits == 8 else 0.1)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_tracks_the_float_model_and_round_trips(checkpoint, tmp_path, method):
    base = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    quant = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize=method, quantize_group_size=32)
    layers = [m for m in quant.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 7 * CONFIG["text_config"]["num_hidden_layers"]
    assert isinstance(quant.lm_head, torch.nn.Linear) and quant.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.float32
    ids = make_prompt(torch.Generator().manual_seed(0), CONFIG, 0, 20)[None]
    with torch.no_grad():
        a, b = base(input_ids=ids).logits, quant(input_ids=ids).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < (0.02 if method == "int8" else 0.15), rel
    quant.save_pretrained(tmp_path)
    again = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert sum(isinstance(m, QuantizedLinear) for m in again.modules()) == len(layers)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, b)
    with pytest.raises(ValueError, match="already quantized"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantize="int8")


def test_unknown_method_is_rejected(checkpoint):
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="quantize='int3' is not supported"):
        quantize_model(model, "int3")
