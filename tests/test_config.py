import json

import pytest
import torch
from transformers import Idefics2Config as RefConfig
from transformers import Idefics2ForConditionalGeneration as RefModel

from idefics2 import ConfigError, Idefics2Config, Idefics2ForConditionalGeneration
from idefics2.config import MistralTextConfig

ARCHITECTURE_FIELDS = {
    "vision_config": ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                      "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout"],
    "perceiver_config": ["hidden_act", "hidden_size", "rms_norm_eps", "resampler_n_latents", "resampler_depth",
                         "resampler_n_heads", "resampler_head_dim", "num_key_value_heads", "attention_dropout"],
    "text_config": ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                    "pad_token_id", "bos_token_id", "eos_token_id", "sliding_window", "attention_dropout",
                    "tie_word_embeddings"],
}


def assert_same_architecture(ours: Idefics2Config, ref: RefConfig) -> None:
    assert ours.image_token_id == ref.image_token_id
    assert ours.tie_word_embeddings == ref.tie_word_embeddings
    assert ours.use_cache == ref.use_cache
    for sub, fields in ARCHITECTURE_FIELDS.items():
        for name in fields:
            assert getattr(getattr(ours, sub), name) == getattr(getattr(ref, sub), name), f"{sub}.{name}"
    assert ours.text_config.rope_theta == ref.text_config.rope_parameters["rope_theta"]


def test_published_config_loads_like_the_reference(fixture_8b_dir):
    ours = Idefics2Config.from_pretrained(fixture_8b_dir)
    ref = RefConfig.from_pretrained(fixture_8b_dir)
    assert_same_architecture(ours, ref)
    assert ours.vision_config.hidden_size == 1152 and ours.text_config.vocab_size == 32003
    assert ours.perceiver_config.rms_norm_eps == 1e-6 and ours.text_config.rms_norm_eps == 1e-5


def test_defaults_are_the_8b_values(fixture_8b_dir):
    assert_same_architecture(Idefics2Config(), RefConfig.from_pretrained(fixture_8b_dir))


def test_config_written_back_equal(fixture_8b_dir, tmp_path):
    ours = Idefics2Config.from_pretrained(fixture_8b_dir)
    ours.save_pretrained(tmp_path)
    again = Idefics2Config.from_pretrained(tmp_path)
    assert again == ours
    assert again.to_dict() == ours.to_dict()
    # transformers reads what we wrote as the same architecture as the published file.
    assert_same_architecture(again, RefConfig.from_pretrained(tmp_path))
    with open(f"{fixture_8b_dir}/config.json") as f:
        published = json.load(f)
    assert ours.extra["architectures"] == published["architectures"]


def test_full_8b_model_on_meta_matches_reference_state_dict(fixture_8b_dir):
    config = Idefics2Config.from_pretrained(fixture_8b_dir)
    with torch.device("meta"):
        ours = Idefics2ForConditionalGeneration(config)
        ref = RefModel(RefConfig.from_pretrained(fixture_8b_dir))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(ours_shapes) == 763
    assert ours_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == 8_402_768_112


def test_v4_rope_theta_and_v5_rope_parameters_agree():
    v4 = MistralTextConfig.from_dict({"rope_theta": 5000.0})
    v5 = MistralTextConfig.from_dict({"rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"}})
    assert v4.rope_theta == v5.rope_theta == 5000.0
    assert v5.to_dict()["rope_parameters"] == {"rope_theta": 5000.0, "rope_type": "default"}


def test_perceiver_width_follows_text_width_like_reference():
    d = {"text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "rms_norm_eps": 1e-4, "vocab_size": 32003}}
    ours, ref = Idefics2Config.from_dict(d), RefConfig(**json.loads(json.dumps(d)))
    assert ours.perceiver_config.hidden_size == ref.perceiver_config.hidden_size == 64
    assert ours.perceiver_config.rms_norm_eps == ref.perceiver_config.rms_norm_eps == 1e-4


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"vision_config": {"hidden_size": 100, "num_attention_heads": 16}}, "vision_config.num_attention_heads"),
        ({"text_config": {"num_attention_heads": 8, "num_key_value_heads": 16}}, "text_config.num_key_value_heads"),
        ({"text_config": {"num_attention_heads": 32, "num_key_value_heads": 6}}, "text_config.num_key_value_heads"),
        ({"text_config": {"hidden_size": 100, "num_attention_heads": 32}}, "text_config.num_attention_heads"),
        ({"perceiver_config": {"resampler_n_heads": 4, "num_key_value_heads": 8}},
         "perceiver_config.num_key_value_heads"),
        ({"vision_config": {"patch_size": 0}}, "vision_config.patch_size"),
        ({"text_config": {"hidden_act": "swish2"}}, "text_config.hidden_act"),
        ({"image_token_id": 40000}, "image_token_id"),
        ({"text_config": {"model_type": "llama"}}, "text_config.model_type"),
        ({"attn_implementation": "fast"}, "attn_implementation"),
    ],
)
def test_inconsistent_configs_are_rejected_naming_the_field(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Idefics2Config.from_dict(bad)


def test_missing_config_json_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Idefics2Config.from_pretrained(tmp_path)
