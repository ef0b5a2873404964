"""Idefics2Processor: parity with transformers 5.24 `Idefics2Processor` (PIL image processor) on the published
files (hub and transformers-5 layouts) and on a small trained tokenizer; chat template; errors; BatchFeature."""

from __future__ import annotations

import base64
import io
import os
import warnings

import numpy as np
import pytest
import torch

from idefics2.batch_feature import BatchFeature
from idefics2.media import ImageLoadError
from idefics2.processing import Idefics2Processor

FIXTURE_8B = os.path.join(os.path.dirname(__file__), "fixtures", "idefics2-8b")

SPEC_CHAT = [
    {"role": "user", "content": [
        {"type": "text", "text": "What do these images show?"}, {"type": "image"}, {"type": "image"}, "ignored"]},
    {"role": "assistant", "content": [{"type": "text", "text": "The first image shows the statue of Liberty in New "
                                       "York. The second image picture depicts Idefix, the dog of Obelix in Asterix "
                                       "and Obelix."}]},
    {"role": "user", "content": [{"type": "text", "text": "And who is that?"}]},
]
SPEC_RENDERED = (
    "User: What do these images show?<image><image><end_of_utterance>\nAssistant: The first image shows the statue "
    "of Liberty in New York. The second image picture depicts Idefix, the dog of Obelix in Asterix and Obelix."
    "<end_of_utterance>\nUser: And who is that?<end_of_utterance>\nAssistant:"
)


def _reference_processor(directory, **kwargs):
    from transformers import AutoProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Where torchvision is installed transformers picks its torchvision image processor by default; the
        # parity target is the PIL one.
        processor = AutoProcessor.from_pretrained(directory, backend="pil", **kwargs)
    assert type(processor.image_processor).__name__ == "Idefics2ImageProcessorPil"
    return processor


@pytest.fixture(scope="module")
def reference():
    return _reference_processor(FIXTURE_8B)


@pytest.fixture(scope="module")
def ours():
    return Idefics2Processor.from_pretrained(FIXTURE_8B)


@pytest.fixture
def splitting(request, reference, ours):
    """Set the splitting attribute on both processors (the reference expands text by the attribute)."""
    value = request.param
    old = (reference.image_processor.do_image_splitting, ours.image_processor.do_image_splitting)
    reference.image_processor.do_image_splitting = ours.image_processor.do_image_splitting = value
    yield value
    reference.image_processor.do_image_splitting, ours.image_processor.do_image_splitting = old


def assert_same(ref_out, our_out):
    assert list(ref_out.keys()) == list(our_out.keys())
    for key in ref_out:
        ref_value, our_value = ref_out[key], our_out[key]
        assert type(ref_value) is type(our_value), key
        if key == "pixel_values":
            ref_value, our_value = np.asarray(ref_value), np.asarray(our_value)
            assert ref_value.shape == our_value.shape and ref_value.dtype == our_value.dtype
            assert np.abs(ref_value - our_value).max() <= 1e-6
        elif isinstance(ref_value, list):
            assert ref_value == our_value, key
        else:
            assert ref_value.dtype == our_value.dtype, key
            np.testing.assert_array_equal(np.asarray(ref_value), np.asarray(our_value), err_msg=key)


def run_both(reference, ours, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_out = reference(**kwargs)
    our_out = ours(**kwargs)
    assert_same(ref_out, our_out)
    return our_out


def _cases(make_test_image):
    img = make_test_image
    return [
        {"text": "A text-only prompt, no images."},
        {"text": ["short", "a much longer text-only prompt"], "padding": True},
        {"text": "<image>In this image, we see", "images": img(640, 480, "RGB", 1)},
        {"text": ["<image>In this image, we see", "bla, bla <image><image>"],
         "images": [[img(300, 2000, "RGBA", 2)], [img(1920, 1080, "L", 3), img(50, 60, "P", 4)]], "padding": True},
        {"text": ["no images here", "bla<image>"], "images": [[], [img(30, 40, "CMYK", 5)]], "padding": True,
         "return_tensors": "pt"},
        {"text": ["a <image>", "b <image> c <image>\n"], "images": [img(30, 40), img(500, 400, "LA"), img(981, 500)],
         "padding": "max_length", "max_length": 700, "return_tensors": "np"},
        {"text": "<image><image> two in a row, then text<end_of_utterance>\nAssistant:",
         "images": [img(13, 13, "I;16"), img(4000, 3000, "RGB", 6)], "add_special_tokens": False},
        {"images": [img(100, 200, "RGBA", 7), img(200, 100)]},
        {"images": [[img(100, 200)], [img(200, 100), img(64, 64)]], "return_tensors": "pt"},
    ]


@pytest.mark.parametrize("splitting", [False, True], indirect=True)
def test_parity_prompts_and_images(reference, ours, make_test_image, splitting):
    for case in _cases(make_test_image):
        run_both(reference, ours, **case)


def test_expansion_layout(ours, make_test_image):
    ours_tokens = ours.tokenizer.convert_ids_to_tokens
    image = make_test_image(20, 20)
    ids = ours(text="<image>In", images=image, do_image_splitting=False)["input_ids"][0]
    assert ids[:2] == [1, 32000] and ids[2:66] == [32001] * 64 and ids[66] == 32000
    assert ours_tokens(ids[67]) == "▁In"  # the transformers-5 space after a fake token
    split_ids = ours(text="<image>", images=image, do_image_splitting=True)["input_ids"][0]
    assert split_ids.count(32000) == 6 and split_ids.count(32001) == 5 * 64


# -------------------------------------------------------------------------------------------------- layouts
@pytest.fixture(scope="module")
def v5_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("processor_v5")
    _reference_processor(FIXTURE_8B).save_pretrained(directory)
    assert (directory / "chat_template.jinja").exists() and not (directory / "preprocessor_config.json").exists()
    return str(directory)


def test_transformers5_layout(v5_dir, reference, make_test_image):
    ours_v5 = Idefics2Processor.from_pretrained(v5_dir)
    assert ours_v5.chat_template == reference.chat_template
    assert ours_v5.image_seq_len == 64 and ours_v5.image_processor.do_image_splitting is True
    reference_v5 = _reference_processor(v5_dir)
    for case in _cases(make_test_image)[:5]:
        run_both(reference_v5, ours_v5, **case)


def test_save_pretrained_loads_in_transformers(ours, tmp_path, make_test_image):
    ours.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
            "special_tokens_map.json"} <= set(os.listdir(tmp_path))
    again = Idefics2Processor.from_pretrained(tmp_path)
    assert again.chat_template == ours.chat_template and again.image_seq_len == ours.image_seq_len
    reference_again = _reference_processor(str(tmp_path))
    for case in _cases(make_test_image)[:5]:
        run_both(reference_again, again, **case)


def test_chat_template_sources(tmp_path, ours):
    ours.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['role'] }}")
    assert Idefics2Processor.from_pretrained(tmp_path).chat_template == "{{ messages[0]['role'] }}"
    os.remove(tmp_path / "chat_template.jinja")
    (tmp_path / "chat_template.json").write_text('{"chat_template": "json {{ add_generation_prompt }}"}')
    assert Idefics2Processor.from_pretrained(tmp_path).apply_chat_template([{"role": "u", "content": []}]) == (
        "json False")


def test_legacy_tokenization_option():
    legacy = Idefics2Processor.from_pretrained(FIXTURE_8B, legacy_tokenization=True)
    ids = legacy(text="Hi<end_of_utterance>\nAssistant:")["input_ids"][0]
    assert ids[-6:] == [32002, 28705, 13, 7226, 11143, 28747]
    default = Idefics2Processor.from_pretrained(FIXTURE_8B)
    assert default(text="Hi<end_of_utterance>\nAssistant:")["input_ids"][0][-5:] == [32002, 13, 7226, 11143, 28747]


# ---------------------------------------------------------------------------------------------- chat template
def test_chat_template_exact_strings(reference, ours):
    assert ours.apply_chat_template(SPEC_CHAT, add_generation_prompt=True) == SPEC_RENDERED
    system_chat = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}] + SPEC_CHAT
    image_first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    for chat in (SPEC_CHAT, system_chat, image_first):
        for generation_prompt in (True, False):
            expected = reference.apply_chat_template(chat, add_generation_prompt=generation_prompt)
            assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt) == expected
    batched = ours.apply_chat_template([image_first, system_chat], add_generation_prompt=True)
    assert batched == [reference.apply_chat_template(c, add_generation_prompt=True) for c in (image_first, system_chat)]
    assert ours.apply_chat_template(image_first, add_generation_prompt=True).startswith("User:<image>What")


def test_chat_template_tokenize_with_images(reference, ours, make_test_image, tmp_path):
    image = make_test_image(400, 300, "RGB", 11)
    path = tmp_path / "photo.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    chat = [
        {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A noisy picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare with"}, {"type": "image", "path": str(path)},
                                     {"type": "image", "base64": data_uri}]},
    ]
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_out = reference.apply_chat_template(chat, **kwargs)
    our_out = ours.apply_chat_template(chat, **kwargs)
    assert_same(ref_out, our_out)
    assert our_out["pixel_values"].shape[:2] == (1, 15)
    ids = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert ids == reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)


def test_chat_template_string_content_and_remote_urls(ours):
    rendered = ours.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert rendered == "User: Hello<end_of_utterance>\nAssistant:"
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                                         {"type": "text", "text": "What?"}]}]
    assert ours.apply_chat_template(chat) == "User:<image>What?<end_of_utterance>\n"
    with pytest.raises(ImageLoadError, match="remote images are disabled"):
        ours.apply_chat_template(chat, tokenize=True)


def test_chat_template_is_sandboxed(ours):
    from jinja2.exceptions import SecurityError

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SecurityError):
        ours.apply_chat_template([{"role": "user", "content": []}], chat_template=evil)


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("text", "images", "match"),
    [
        ("<image>one", [], "images must be"),
        ("<image>one", [[]], "sample 0: the text has 1 <image> token"),
        ("<image>one", [[0, 0]], "sample 0, image 0"),
        (["<image>", "<image>"], [["IMG", "IMG"]], "2 prompt"),
        ("<image>one", "IMAGES2", r"1 <image> token\(s\) in total"),
        (["<image>", "x"], [["IMG"], ["IMG"]], "sample 1: the text has 0 <image> token"),
        (["<image><image>", "<image>"], [["IMG"], ["IMG", "IMG"]], "sample 0: the text has 2"),
        ("no image token", "IMG", "sample 0: the text has 0"),
        ("<image> without images", None, "sample 0: the text has 1 <image> token.* no images"),
    ],
)
def test_image_count_mismatches(ours, make_test_image, text, images, match):
    image = make_test_image(20, 20)
    replace = {"IMG": image, "IMAGES2": [image, image]}
    if isinstance(images, str):
        images = replace[images]
    elif isinstance(images, list):
        images = [[replace.get(i, i) if isinstance(i, str) else i for i in s] if isinstance(s, list) else s
                  for s in images]
    with pytest.raises((ValueError, TypeError), match=match):
        ours(text=text, images=images)


def test_other_errors(ours, make_test_image, tmp_path):
    with pytest.raises(ValueError, match="pass text, images or both"):
        ours()
    with pytest.raises(ValueError, match="truncation"):
        ours(text="<image>" + " word" * 10, images=make_test_image(20, 20), truncation=True, max_length=20)
    with pytest.raises(ImageLoadError, match="sample 0, image 0: .*max_image_pixels"):
        ours(text="<image>", images=make_test_image(200, 200), max_image_pixels=1000)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ImageLoadError, match="sample 1, image 0: .*not an image"):
        ours(text=["x", "<image>"], images=[[], [str(bad)]])
    with pytest.raises(ImageLoadError, match="remote images are disabled"):
        ours(text="<image>", images="http://example.com/x.png")
    with pytest.raises(TypeError, match="unexpected arguments"):
        ours(text="x", bogus=1)
    with pytest.raises(ValueError, match="padding=True"):
        ours(text=["a", "a b c"], return_tensors="pt")


def test_call_level_splitting_keeps_text_and_images_consistent(ours, make_test_image):
    out = ours(text="<image>", images=make_test_image(50, 50), do_image_splitting=False)
    assert out["pixel_values"].shape[1] == 1 and out["input_ids"][0].count(32001) == 64


def test_numpy_and_tensor_images_are_accepted(ours, make_test_image):
    image = make_test_image(60, 40)
    from_pil = ours(text="<image>", images=image)
    from_numpy = ours(text="<image>", images=np.asarray(image))
    from_tensor = ours(text="<image>", images=torch.from_numpy(np.asarray(image).copy()))
    np.testing.assert_array_equal(from_pil["pixel_values"], from_numpy["pixel_values"])
    np.testing.assert_array_equal(from_pil["pixel_values"], from_tensor["pixel_values"])


# -------------------------------------------------------------------------------------- small trained vocabulary
def test_small_tokenizer_processor_parity(small_tokenizer_dir, make_test_image):
    from transformers import AutoTokenizer
    from transformers import Idefics2Processor as ReferenceProcessor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ReferenceProcessor(
            image_processor=Idefics2ImageProcessorPil.from_pretrained(small_tokenizer_dir),
            tokenizer=AutoTokenizer.from_pretrained(small_tokenizer_dir), image_seq_len=2,
        )
    ours = Idefics2Processor.from_pretrained(small_tokenizer_dir)
    assert ours.image_seq_len == 2
    for case in _cases(make_test_image)[:6]:
        run_both(reference, ours, **case)
    out = ours(text=["<image>a cat", "two <image><image> dogs 😀"], images=[[make_test_image(30, 30)],
               [make_test_image(40, 50), make_test_image(400, 500)]], padding=True, return_tensors="pt")
    assert ours.batch_decode(out["input_ids"], skip_special_tokens=True) == reference.batch_decode(
        out["input_ids"], skip_special_tokens=True)
    assert ours.decode(out["input_ids"][1]) == reference.decode(out["input_ids"][1])


# -------------------------------------------------------------------------------------------------- BatchFeature
def test_batch_feature_behaves_like_transformers(ours, make_test_image):
    out = ours(text=["<image>a", "b"], images=[[make_test_image(30, 30)], []], padding=True, return_tensors="pt")
    assert isinstance(out, BatchFeature) and isinstance(out, dict)
    assert out.input_ids is out["input_ids"]
    assert list(out.keys()) == ["input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"]
    moved = {k: v.to("cpu") for k, v in out.items()}
    assert set(moved) == set(out)
    out.to(torch.bfloat16)
    assert out["pixel_values"].dtype == torch.bfloat16 and out["input_ids"].dtype == torch.int64
    out.to("cpu", torch.float32)
    assert out["pixel_values"].dtype == torch.float32 and out["pixel_attention_mask"].dtype == torch.int64

    def consume(input_ids, attention_mask, pixel_values, pixel_attention_mask):
        return input_ids.shape[0]

    assert consume(**out) == 2
    with pytest.raises(AttributeError):
        _ = out.labels
