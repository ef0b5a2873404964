"""Streaming and the pipeline convenience, on a tiny random checkpoint with the real Mistral tokenizer."""

import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image

from idefics2 import TextStreamer


@pytest.fixture(scope="module")
def ask(tmp_path_factory):
    runner = tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    runner.processor.image_processor.do_image_splitting = False
    return runner


def test_stream_pieces_join_to_the_full_answer(ask):
    image = Image.new("RGB", (40, 30), (250, 10, 10))
    full = ask("Describe.", images=[image], max_new_tokens=12, eos_token_id=None)
    pieces = list(ask.stream("Describe.", images=[image], max_new_tokens=12, eos_token_id=None))
    assert len(pieces) >= 2
    assert "".join(pieces).strip() == full


class FakeTokenizer:
    """Byte-level decode, to check that multi-byte characters are never split."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_streamer_never_emits_half_a_character():
    pieces = []
    streamer = TextStreamer(FakeTokenizer(), skip_prompt=True, on_text=pieces.append)
    streamer.put(torch.tensor([[65]]))  # the prompt, skipped
    for byte in "né 🙂!".encode():
        streamer.put(torch.tensor([byte]))
    streamer.end()
    assert "".join(pieces) == "né 🙂!"
    assert all("\ufffd" not in p for p in pieces)


def test_pipeline_encodes_each_image_once_and_matches_the_pixel_path(ask, make_test_image):
    """The pipeline's inputs (ids from the processor's text expansion, images as cached features) give the ids
    and the answer the processor's pixel inputs give; a second question about the same image (or an equal copy
    of it) does not run the vision tower again; other images, or the same image with other processor settings, do."""
    import numpy as np

    encoded = []
    hook = ask.model.model.vision_model.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
    try:
        first, second = make_test_image(50, 40, seed=1), make_test_image(30, 60, seed=2)
        for prompt, images in (("What is this?", [first]), ("Compare them.", [first, second])):
            messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]}]
            text = ask.processor.apply_chat_template(messages, add_generation_prompt=True)
            pixels = dict(ask.processor(text=text, images=images, return_tensors="pt"))
            inputs = ask.inputs(prompt, images)
            assert torch.equal(inputs["input_ids"], pixels["input_ids"])
            with torch.inference_mode():
                expected, _ = ask.model.model.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"])
            torch.testing.assert_close(inputs["image_hidden_states"], expected, rtol=1e-5, atol=1e-5)
            gen = dict(max_new_tokens=8, do_sample=False)
            assert torch.equal(ask.model.generate(**inputs, **gen), ask.model.generate(**pixels, **gen))
        encoded.clear()
        ask.inputs("Again?", [first.copy()])  # same content, another object: a cache hit
        ask.inputs("As an array?", [np.asarray(second)])  # other type: its own key
        assert encoded == [1]
        ask.processor.image_processor.do_image_splitting = True
        try:
            ask.inputs("Split?", [first])
        finally:
            ask.processor.image_processor.do_image_splitting = False
        assert encoded == [1, 5]
    finally:
        hook.remove()


def test_stream_runs_on_the_callers_thread_outside_inference_mode(ask):
    """The iterator drives generation step by step on the calling thread (a worker thread's OpenMP regions were
    slower); the caller's code between pieces is not in inference mode; stopping early is fine; beam search is
    refused as generate(streamer=...) refuses it."""
    import threading

    image = Image.new("RGB", (40, 30), (10, 250, 10))
    threads = set()
    hook = ask.model.register_forward_hook(lambda m, args, out: threads.add(threading.get_ident()))
    try:
        modes = [torch.is_inference_mode_enabled() for _ in ask.stream("Describe.", images=[image], max_new_tokens=6,
                                                                       eos_token_id=None)]
        assert threads == {threading.get_ident()} and modes and not any(modes)
        for _ in ask.stream("Describe.", images=[image], max_new_tokens=6, eos_token_id=None):
            break
        assert not torch.is_inference_mode_enabled()
        with pytest.raises(ValueError, match="beam search"):
            list(ask.stream("Describe.", images=[image], max_new_tokens=5, num_beams=2))
    finally:
        hook.remove()
