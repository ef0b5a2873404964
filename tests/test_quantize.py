"""Weight-only int8 / int4 quantization: accuracy, checkpoint round trip, and what stays in float."""

import pytest
import torch
from reference import make_prompt, reference_model, tiny_config_dict

from idefics2 import Idefics2ForConditionalGeneration, kernels
from idefics2.quantize import QuantizedLinear, quantize_model

CONFIG = tiny_config_dict()
# int4 needs widths that are multiples of its group size and of 16 (true of every Idefics2 size)
CONFIG["text_config"].update(hidden_size=128, intermediate_size=256)
CONFIG["perceiver_config"].update(hidden_size=128)


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
    assert len(layers) == 7 * CONFIG["text_config"]["num_hidden_layers"] + 1  # + lm_head
    head_bits = 8 if method == "int8" else 4  # the layers' method; int4 rows padded 120 -> 128
    assert isinstance(quant.lm_head, QuantizedLinear) and quant.lm_head.bits == head_bits
    assert quant.config.extra["quantization_config"]["lm_head"] == method
    assert quant.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.float32
    assert isinstance(quant.model.connector.modality_projection.gate_proj, torch.nn.Linear)
    ids = make_prompt(torch.Generator().manual_seed(0), CONFIG, 0, 20)[None]
    with torch.no_grad():
        a, b = base(input_ids=ids).logits, quant(input_ids=ids).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < (0.02 if method == "int8" else 0.25), rel  # int4 of random Gaussian weights: ~0.15
    quant.save_pretrained(tmp_path)
    again = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    again_layers = [m for m in again.modules() if isinstance(m, QuantizedLinear)]
    assert len(again_layers) == len(layers)
    if kernels.kernel_available():  # used in place from the file mapping, not copied into memory
        assert not any(m.qweight.untyped_storage().resizable() for m in again_layers)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, b)
    assert isinstance(again.lm_head, QuantizedLinear) and again.lm_head.bits == head_bits
    with pytest.raises(ValueError, match="already quantized"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantize="int8")


def test_lm_head_can_stay_float_and_older_checkpoints_keep_it_float(checkpoint, tmp_path):
    import json

    float_head = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize="int8", quantize_lm_head=False)
    assert type(float_head.lm_head) is not QuantizedLinear and "lm_head" not in \
        float_head.config.extra["quantization_config"]
    float_head.save_pretrained(tmp_path / "float_head")  # also the layout of checkpoints from before the option
    again = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "float_head")
    assert type(again.lm_head) is not QuantizedLinear
    ids = make_prompt(torch.Generator().manual_seed(3), CONFIG, 0, 12)[None]
    head = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize="int8")
    with torch.no_grad():  # the int8 head changes the logits by rounding only
        a, b = float_head(input_ids=ids).logits, head(input_ids=ids).logits
    assert 0 < ((a - b).norm() / a.norm()).item() < 0.01
    config_path = tmp_path / "float_head" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["lm_head"] = "int3"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lm_head is quantized as 'int3'; only 'int8' and 'int4' are known"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "float_head")


def test_unknown_method_and_unfit_widths_are_rejected(checkpoint, tmp_path):
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="quantize='int3' is not supported"):
        quantize_model(model, "int3")
    narrow = tiny_config_dict()  # text hidden size 64
    reference_model(narrow, seed=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model\.text_model\.layers\.0\.self_attn\.q_proj: int4 needs group_size "
                                         r"32, 64 or 128 and in_features divisible by it; got in_features=64, "
                                         r"group_size=128"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantize="int4", quantize_group_size=128)
    with pytest.raises(ValueError, match="quantize_lm_head='int3'"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantize="int8", quantize_lm_head="int3")


def test_int4_rows_are_padded_to_whole_blocks_and_dropped_again():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 40, bias=False)  # 40 rows: stored as 3 blocks of 16, 8 padding rows
    q = QuantizedLinear.from_linear(linear, 4, 32)
    assert q.qweight.shape == (3, 8 * 64) and q.padded_rows == 48
    weight = q.dequantize()
    assert weight.shape == (40, 64) and (weight - linear.weight).abs().max() < 0.1 * linear.weight.abs().max()
    with torch.no_grad():
        for rows in (3, 20):  # the decoding kernel (or torch's op) and the prefill path
            x = torch.randn(rows, 64)
            y = q(x)
            assert y.shape == (rows, 40)
            exact = x @ weight.t()
            assert ((y - exact).norm() / exact.norm()).item() < 0.01


def test_lm_head_method_can_differ_from_the_layers(checkpoint, tmp_path):
    quant = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize="int4", quantize_group_size=32,
                                                             quantize_lm_head="int8")
    assert quant.lm_head.bits == 8 and quant.model.text_model.layers[0].mlp.up_proj.bits == 4
    quant.save_pretrained(tmp_path)
    again = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert again.lm_head.bits == 8 and again.config.extra["quantization_config"]["lm_head"] == "int8"
    floating = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize="int4", quantize_group_size=32,
                                                                quantize_lm_head=False)
    assert isinstance(floating.lm_head, torch.nn.Linear)


def test_int4_packing_round_trips_in_the_x16_layout():
    from idefics2.quantize import deinterleave_rows, interleave_rows, pack_int4, unpack_int4

    q = torch.randint(0, 16, (48, 256), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 2048) and torch.equal(unpack_int4(packed), q)
    # block 1, step 5 (elements 40..47), byte 4r + t: element 40 + t of row 16 + r low, 44 + t high
    r, t = 7, 2
    byte = packed[1, 64 * 5 + 4 * r + t].item()
    assert (byte & 15, byte >> 4) == (q[16 + r, 40 + t].item(), q[16 + r, 44 + t].item())
    scales = torch.randn(48, 4)
    assert interleave_rows(scales).shape == (3, 4, 16) and interleave_rows(scales)[2, 1, 3] == scales[35, 1]
    assert torch.equal(deinterleave_rows(interleave_rows(scales)), scales)


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_kernel_and_prefill_op_agree(bits):
    """<= 16 rows run on idefics2's kernel, more on torch's op: both compute the same dequantized matmul."""
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(torch.nn.Linear(256, 160, bias=False), bits, 64)
    x = torch.randn(20, 256)
    with torch.no_grad():
        full = q(x)  # 20 rows: torch's op
        rows = torch.cat([q(x[i:i + 4]) for i in range(0, 20, 4)])  # 4 rows at a time: the kernel
    exact = x.to(torch.bfloat16).float() @ q.dequantize().t()
    for y in (full, rows):
        assert ((y - exact).norm() / exact.norm()).item() < 0.01


@pytest.mark.parametrize("layout", [None, "chunk128"])
def test_int4_checkpoint_from_an_earlier_layout_is_refused(checkpoint, tmp_path, layout):
    import json

    quant = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize="int4", quantize_group_size=32)
    quant.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["int4_layout"] == "x16"
    if layout is None:
        del config["quantization_config"]["int4_layout"]
    else:
        config["quantization_config"]["int4_layout"] = layout
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"layout '{layout or 'pairs'}' of an earlier .*quantize the float checkpoint again"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("bits", [8, 4])
def test_projections_share_one_kernel_call_with_the_same_results(bits):
    from idefics2 import kernels
    from idefics2.layers import parallel_linears

    if not kernels.kernel_available() or (bits == 4 and not kernels.int4_kernel_available()):
        pytest.skip("the int8 / int4 decoding kernels are not available here")
    torch.manual_seed(0)
    layers = [QuantizedLinear.from_linear(torch.nn.Linear(256, n, bias=False), bits) for n in (128, 64, 64)]
    x = torch.randn(2, 1, 256).to(torch.bfloat16)
    with torch.no_grad():
        assert QuantizedLinear.parallel_forward(x, tuple(layers)) is not None  # one call for the three
        together = parallel_linears(x, *layers)
        alone = [layer(x) for layer in layers]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    if bits == 4:  # int4 layers of different group sizes: module by module
        other = QuantizedLinear.from_linear(torch.nn.Linear(256, 64, bias=False), 4, group_size=128)
        assert QuantizedLinear.parallel_forward(x, (layers[0], other)) is None


def test_other_devices_dequantize_with_a_warning():
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(torch.nn.Linear(128, 32, bias=False), 8)
    x = torch.randn(2, 128)
    q.forward(x)  # the CPU path: no warning
    meta = QuantizedLinear.from_linear(torch.nn.Linear(128, 32, bias=False), 8).to("meta")
    with pytest.warns(RuntimeWarning, match="no meta kernel yet: each call dequantizes its weight"):
        out = meta(x.to("meta"))
    assert out.shape == (2, 32) and out.device.type == "meta"
