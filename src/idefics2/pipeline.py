"""The common case in two lines: `ask = idefics2.pipeline("path/to/idefics2-8b"); ask("What is this?", images=[img])`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .engine import FeatureCache
from .modeling import Idefics2ForConditionalGeneration
from .processing import Idefics2Processor
from .streaming import stream_generate


def processing_settings_key(processor) -> str:
    """The image processor settings that change an image's features, as a string for cache keys."""
    ip = processor.image_processor
    settings = {k: getattr(ip, k, None) for k in ("do_image_splitting", "size", "do_resize", "do_normalize",
                                                   "image_mean", "image_std", "do_rescale", "rescale_factor",
                                                   "do_convert_rgb", "do_pad")}
    return json.dumps(settings, sort_keys=True, default=str)


class ImageFeatures:
    """generate() inputs with images given as features (`image_hidden_states`) instead of pixels. Each image is
    encoded alone (its features do not depend on the other images of a prompt) and kept in an LRU keyed by its
    content and the processor's settings, so asking again about the same image (several questions about one
    document, a chat's later turns) skips the vision tower and connector."""

    def __init__(self, model, processor, max_bytes: int = 256 * 2**20) -> None:
        self.model, self.processor = model, processor
        self.cache = FeatureCache(max_bytes)

    def key(self, image: Any) -> str | None:
        """A content key for in-memory images (PIL, numpy, torch); None for anything else (paths, URLs)."""
        if hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):  # PIL
            head, data = f"pil|{image.mode}|{image.size}", image.tobytes()
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            array = np.ascontiguousarray(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image)
            head, data = f"array|{array.dtype}|{array.shape}", array.tobytes()
        else:
            return None
        digest = hashlib.sha256(data)
        digest.update(f"{head}|{processing_settings_key(self.processor)}".encode())
        return digest.hexdigest()

    @torch.inference_mode()
    def encode(self, image: Any) -> torch.Tensor:
        """[sub-images, n_latents, hidden] for one image, from the cache or the vision tower and connector."""
        key = self.key(image)
        features = self.cache.get(key) if key else None
        if features is None:
            pixels = self.processor(images=[image], return_tensors="pt")
            device = self.model.device
            features, _ = self.model.model.get_image_features(pixels["pixel_values"].to(device),
                                                              pixels["pixel_attention_mask"].to(device))
            if key:
                self.cache.put(key, features)
        return features

    def inputs(self, text: str, images: list) -> dict[str, Any]:
        """generate()'s inputs for a templated prompt: ids from the processor's own text expansion, images as
        features (in the order of their <image> tokens)."""
        encoded = self.processor.tokenizer(self.processor.expand_image_tokens(text), return_tensors="pt")
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if images:
            inputs["image_hidden_states"] = torch.cat([self.encode(image) for image in images])
        return inputs


class Idefics2Pipeline:
    """Chat-template a question about images, generate, and decode the answer (or stream it). Images are encoded
    once per content (`ImageFeatures`): more questions about the same image reuse its features."""

    def __init__(self, model: Idefics2ForConditionalGeneration, processor: Idefics2Processor,
                 feature_cache_bytes: int = 256 * 2**20) -> None:
        self.model = model
        self.processor = processor
        self.images = ImageFeatures(model, processor, feature_cache_bytes)

    def inputs(self, prompt: str, images: list | None = None) -> dict[str, Any]:
        images = list(images or [])
        messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.images.inputs(text, images)

    def __call__(self, prompt: str, images: list | None = None, max_new_tokens: int = 256, **generate_kwargs: Any
                 ) -> str:
        inputs = self.inputs(prompt, images)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new_tokens, skip_special_tokens=True).strip()

    def stream(self, prompt: str, images: list | None = None, max_new_tokens: int = 256, **generate_kwargs: Any
               ) -> Iterator[str]:
        yield from stream_generate(self.model, self.processor.tokenizer, **self.inputs(prompt, images),
                                   max_new_tokens=max_new_tokens, **generate_kwargs)


def pipeline(model_dir: str | os.PathLike, **load_kwargs: Any) -> Idefics2Pipeline:
    """Load a checkpoint directory (weights + processor files); `load_kwargs` go to `from_pretrained`."""
    return Idefics2Pipeline(Idefics2ForConditionalGeneration.from_pretrained(model_dir, **load_kwargs),
                            Idefics2Processor.from_pretrained(model_dir))
