"""bitsandbytes 4-bit / 8-bit: same quantized logits as transformers, skip lists, prequantized checkpoints."""

import pytest
import torch
from reference import make_prompt, reference_model, tiny_config_dict

pytest.importorskip("bitsandbytes")
import transformers  # noqa: E402

from idefics2 import BitsAndBytesConfig, Idefics2ForConditionalGeneration  # noqa: E402

CONFIG = tiny_config_dict()
# bitsandbytes' CPU 4-bit kernels repack weights in blocks: keep every dimension a multiple of 128.
CONFIG["text_config"].update(hidden_size=128, intermediate_size=256)
CONFIG["perceiver_config"]["hidden_size"] = 128
CONFIG["text_config"]["vocab_size"] = CONFIG["image_token_id"] + 1
SKIP = ["model.vision_model", "model.connector", "lm_head"]  # full names: transformers matches from the start
SETTINGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bnb")
    reference_model(CONFIG, seed=5).save_pretrained(path)
    return path


def is_bnb(module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=make_prompt(g, CONFIG, 1, 9)[None], pixel_values=torch.rand(1, 1, 3, 56, 56, generator=g))


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_quantized_logits_match_transformers(checkpoint, kind):
    ours = Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, quantization_config=BitsAndBytesConfig(**SETTINGS[kind]))
    ref = transformers.Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(**SETTINGS[kind], llm_int8_skip_modules=SKIP)).eval()
    assert (logits(ours) - logits(ref)).abs().max() <= 1e-4
    # The default skip list keeps the vision tower, the connector and lm_head in float.
    assert not is_bnb(ours.lm_head)
    assert not is_bnb(ours.model.connector.modality_projection.gate_proj)
    assert not is_bnb(ours.model.vision_model.encoder.layers[0].self_attn.q_proj)
    assert is_bnb(ours.model.text_model.layers[0].self_attn.q_proj)
    out = ours.generate(**inputs(), max_new_tokens=4)
    assert out.shape[1] == inputs()["input_ids"].shape[1] + 4


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_prequantized_checkpoints_both_ways(checkpoint, tmp_path, kind):
    ref = transformers.Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(**SETTINGS[kind], llm_int8_skip_modules=SKIP)).eval()
    ref.save_pretrained(tmp_path / "ref")
    ours = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "ref")
    assert (logits(ours) - logits(ref)).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    again = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert torch.equal(logits(again), logits(ours))


def test_skip_list_and_bad_configs(checkpoint):
    everything = Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]))
    assert is_bnb(everything.model.connector.modality_projection.gate_proj)
    with pytest.raises(ValueError, match="exactly one of load_in_4bit"):
        BitsAndBytesConfig()
    with pytest.raises(NotImplementedError, match="quantization_config of type object"):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantization_config=object())
