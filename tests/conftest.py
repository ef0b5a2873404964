import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py helpers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
IDEFICS2_8B = os.path.join(FIXTURES, "idefics2-8b")

# Two cores: keep torch from oversubscribing them in the test run.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def fixture_8b_dir() -> str:
    return IDEFICS2_8B


# ---- processor tests (issue #4): deterministic test images and a small trained tokenizer ----------------------
PROCESSOR_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def _make_test_image(width: int, height: int, mode: str = "RGB", seed: int = 0):
    """A noisy PIL image of the given mode, generated from a numpy RNG (no files, no network)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        return Image.fromarray(rgba, "RGBA").convert("LA")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    rgb = Image.fromarray(rgba[..., :3], "RGB")
    if mode == "P_transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 3
        return image
    return rgb if mode == "RGB" else rgb.convert(mode)


@pytest.fixture(scope="session")
def make_test_image():
    return _make_test_image


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory) -> str:
    """A tiny Llama-style tokenizer trained here: BPE with byte fallback (all 256 <0xNN> pieces), Metaspace-style
    `▁` pieces, <unk>/<s>/</s> at ids 0-2, the three idefics2 tokens at the end, and the hub
    tokenizer_config settings."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    corpus = [
        "User: What is in this image? Assistant: A cat sitting on a red sofa.",
        "The quick brown fox jumps over the lazy dog. In this image, we see a bridge.",
        "Describe the picture in detail. There are two dogs and one cat.\nNew line here.",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=PROCESSOR_SPECIAL_TOKENS[:3], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # byte-fallback pieces, so any text (emoji, CJK) is encodable
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(PROCESSOR_SPECIAL_TOKENS[3:])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[
        ("<s>", tok.token_to_id("<s>"))])
    directory = tmp_path_factory.mktemp("small_tokenizer")
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "legacy": False, "clean_up_tokenization_spaces": False,
        "additional_special_tokens": PROCESSOR_SPECIAL_TOKENS[3:], "tokenizer_class": "LlamaTokenizer",
        "processor_class": "Idefics2Processor", "model_max_length": 1000000,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "processor_config.json").write_text(json.dumps({"image_seq_len": 2}))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "do_image_splitting": False, "image_processor_type": "Idefics2ImageProcessor",
        "size": {"shortest_edge": 378, "longest_edge": 980},
    }))
    return str(directory)


def tiny_pipeline(path):
    """A tiny random checkpoint with the real processor files at `path`, loaded as a pipeline."""
    from idefics2.cli import copy_processor_files
    from idefics2.pipeline import pipeline
    from idefics2.presets import write_random_checkpoint

    write_random_checkpoint("tiny", path)
    copy_processor_files(str(path))
    return pipeline(path)
