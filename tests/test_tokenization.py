"""Idefics2Tokenizer: id parity with transformers 5.24 LlamaTokenizer on the real Mistral vocabulary (hub and
transformers-5 layouts) and on a small trained tokenizer; the legacy (transformers 4 / tokenizer.json) mode."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from idefics2.tokenization import Idefics2Tokenizer

FIXTURE_8B = os.path.join(os.path.dirname(__file__), "fixtures", "idefics2-8b")

TEXTS = [
    "hello", " hello", "  two  spaces", "   ", " ", "", "\n", "\nnewline first", "a\n\nb", "tabs\tand\r\nCRLF",
    "<end_of_utterance>\nAssistant:", "<fake_token_around_image>In", "<fake_token_around_image> In",
    "User:<image>What is this?<end_of_utterance>\nAssistant: A cat.", "x<image><image>y", "  <image>  lead",
    "emoji 😀🎉 café naïve 日本語 Ελληνικά", "ÿ\x00\x01 control chars", "trailing   ", "<s>raw bos</s> and <unk>",
    "▁already▁marked", "The quick brown fox jumps over the lazy dog. " * 4, "<end_of_utterance> <end_of_utterance>",
    "numbers 1234567890 and symbols !@#$%^&*()", "<image", "image>", "<<image>>",
]


def _reference_tokenizer(directory):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def reference():
    return _reference_tokenizer(FIXTURE_8B)


@pytest.fixture(scope="module")
def ours():
    return Idefics2Tokenizer.from_pretrained(FIXTURE_8B)


@pytest.fixture(scope="module")
def legacy():
    return Idefics2Tokenizer.from_pretrained(FIXTURE_8B, legacy_tokenization=True)


@pytest.fixture(scope="module")
def v5_dir(tmp_path_factory):
    from transformers import AutoProcessor

    directory = tmp_path_factory.mktemp("v5_layout")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoProcessor.from_pretrained(FIXTURE_8B).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers5(reference, ours, text):
    for special in (True, False):
        assert ours(text, add_special_tokens=special)["input_ids"] == reference(text, add_special_tokens=special)[
            "input_ids"]
    ids = reference(text)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_documented_trap_example(ours, legacy):
    text = "<end_of_utterance>\nAssistant:"
    assert ours.encode(text, add_special_tokens=False) == [32002, 13, 7226, 11143, 28747]
    assert legacy.encode(text, add_special_tokens=False) == [32002, 28705, 13, 7226, 11143, 28747]


@pytest.mark.parametrize("text", TEXTS)
def test_legacy_mode_matches_plain_tokenizer_json(legacy, text):
    plain = tokenizers.Tokenizer.from_file(os.path.join(FIXTURE_8B, "tokenizer.json"))
    assert legacy.encode(text) == plain.encode(text).ids


def test_transformers5_layout_loads_the_same(v5_dir, ours, legacy, reference):
    v5 = Idefics2Tokenizer.from_pretrained(v5_dir)
    v5_legacy = Idefics2Tokenizer.from_pretrained(v5_dir, legacy_tokenization=True)
    reloaded_reference = _reference_tokenizer(v5_dir)
    for text in TEXTS:
        assert v5.encode(text) == ours.encode(text) == reloaded_reference(text)["input_ids"]
        assert v5_legacy.encode(text) == legacy.encode(text)
        assert v5.decode(ours.encode(text)) == reference.decode(ours.encode(text))
    assert v5.padding_side == "left" and v5.pad_token_id == 0


def test_special_tokens_and_vocab(ours, reference):
    assert len(ours) == len(reference) == 32003
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2, 0)
    assert ours.padding_side == "left"
    assert ours.additional_special_tokens == ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    assert ours.convert_tokens_to_ids(["<image>", "<end_of_utterance>", "never-a-token"]) == [32001, 32002, 0]
    assert ours.convert_tokens_to_ids("<fake_token_around_image>") == 32000
    assert ours.convert_ids_to_tokens([1, 560, 32001]) == reference.convert_ids_to_tokens([1, 560, 32001])
    assert ours.tokenize("Hello world") == reference.tokenize("Hello world")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": True},
        {"padding": "longest", "padding_side": "right"},
        {"padding": "max_length", "max_length": 12},
        {"padding": True, "truncation": True, "max_length": 3},
        {"padding": True, "pad_to_multiple_of": 8},
        {"padding": True, "return_tensors": "pt"},
        {"padding": True, "return_tensors": "np"},
        {"truncation": True, "max_length": 4},
    ],
)
def test_batch_padding_and_truncation_match(reference, ours, kwargs):
    batch = ["a b", "hello world there", "<image> x", "a longer sentence with several words in it"]
    ref_out, our_out = reference(batch, **kwargs), ours(batch, **kwargs)
    assert set(ref_out.keys()) == set(our_out.keys()) == {"input_ids", "attention_mask"}
    for key in ref_out:
        ref_value, our_value = ref_out[key], our_out[key]
        if isinstance(ref_value, torch.Tensor):
            assert isinstance(our_value, torch.Tensor) and our_value.dtype == ref_value.dtype
        elif isinstance(ref_value, np.ndarray):
            assert isinstance(our_value, np.ndarray)
        to_list = (lambda v: v.tolist()) if hasattr(ref_value, "tolist") else list
        assert to_list(ref_value) == to_list(our_value)


def test_single_text_shapes_and_decode_inputs(reference, ours):
    assert ours("hi there") == dict(reference("hi there"))
    assert ours("hi", return_tensors="pt")["input_ids"].shape == (1, 2)
    ids = torch.tensor([[1, 560, 32001], [1, 7226, 2]])
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.batch_decode(ids, skip_special_tokens=True) == reference.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(np.array([1, 560])) == reference.decode([1, 560])
    assert ours.decode(560) == reference.decode(560)
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "a b c"], return_tensors="pt")
    with pytest.raises(TypeError, match=r"text\[1\]"):
        ours(["a", 3])


def test_save_and_reload(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    again = Idefics2Tokenizer.from_pretrained(tmp_path)
    reloaded_reference = _reference_tokenizer(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) == reloaded_reference(text)["input_ids"]
    assert again.padding_side == "left" and again.pad_token_id == 0
    legacy = Idefics2Tokenizer.from_pretrained(tmp_path, legacy_tokenization=True)
    assert legacy.encode("<end_of_utterance>\nAssistant:") == [1, 32002, 28705, 13, 7226, 11143, 28747]


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Idefics2Tokenizer.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------- small trained tokenizer
@pytest.fixture(scope="module")
def small_pair(small_tokenizer_dir):
    return _reference_tokenizer(small_tokenizer_dir), Idefics2Tokenizer.from_pretrained(small_tokenizer_dir)


def test_small_tokenizer_matches_reference(small_pair):
    reference, ours = small_pair
    assert len(ours) == len(reference)
    for text in TEXTS:
        assert ours.encode(text) == reference(text)["input_ids"], text
        ids = reference(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


ALPHABET = st.sampled_from(list("ab cat dog\n\t  ") + ["<image>", "<end_of_utterance>", "<s>", "é", "😀", "日"])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(ALPHABET, max_size=20).map("".join))
def test_property_small_tokenizer_random_text(small_pair, text):
    reference, ours = small_pair
    assert ours.encode(text) == reference(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == reference.decode(reference(text)["input_ids"])
