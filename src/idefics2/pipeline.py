"""The common case in two lines: `ask = idefics2.pipeline("path/to/idefics2-8b"); ask("What is this?", images=[img])`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .modeling import Idefics2ForConditionalGeneration
from .processing import Idefics2Processor
from .streaming import stream_generate


class Idefics2Pipeline:
    """Chat-template a question about images, generate, and decode the answer (or stream it)."""

    def __init__(self, model: Idefics2ForConditionalGeneration, processor: Idefics2Processor) -> None:
        self.model = model
        self.processor = processor

    def inputs(self, prompt: str, images: list | None = None) -> dict[str, Any]:
        images = list(images or [])
        messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return dict(self.processor(text=text, images=images or None, return_tensors="pt"))

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
