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
