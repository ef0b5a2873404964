"""Streaming generated text: a transformers-style streamer callback and a Python iterator.

Text is emitted by decoding all the new tokens of a row so far and printing what was not printed yet, so
a multi-byte character split over byte-fallback tokens is held back until complete (no `\ufffd` bits) and
the `▁` word boundaries decode to the right spaces.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch


class TextStreamer:
    """Receives token ids from `generate(streamer=...)` and calls `on_text(piece)` for each new piece.

    Like transformers' TextStreamer: the first `put` is the prompt (skipped with `skip_prompt=True`);
    batch size must be 1. Without `on_text`, pieces are printed to stdout as they come.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_prompt: bool = True,
        skip_special_tokens: bool = True,
        on_text: Callable[[str], None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.on_text = on_text or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self._ids: list[int] = []
        self._printed = 0
        self._seen_prompt = False

    @property
    def prompt_seen(self) -> bool:
        """True once the prompt (the first `put`) has arrived: later puts are generated tokens."""
        return self._seen_prompt

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer streams one sequence; generate with batch size 1")
        ids = value.reshape(-1).tolist()
        if not self._seen_prompt:
            self._seen_prompt = True
            if self.skip_prompt:
                return
        self._ids.extend(ids)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for its remaining bytes
        if len(text) > self._printed:
            self.on_text(text[self._printed:])
            self._printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        if len(text) > self._printed:
            self.on_text(text[self._printed:])
        self._ids, self._printed, self._seen_prompt = [], 0, False


def stream_generate(model, tokenizer: Any, **generate_kwargs: Any) -> Iterator[str]:
    """Yield the text pieces of `model.generate(**generate_kwargs)` as they decode.

    Generation runs on the caller's thread, one step per iteration (`generation.generate_steps`): on a worker
    thread its OpenMP regions took 1.2-1.4x as long on a 2-core machine. Other models (anything with a
    transformers-style `generate(streamer=...)`) run on a worker thread."""
    from .generation import generate_steps
    from .modeling import Idefics2ForConditionalGeneration

    if not isinstance(model, Idefics2ForConditionalGeneration):
        yield from _stream_on_a_thread(model, tokenizer, **generate_kwargs)
        return
    ready: list[str] = []
    streamer = TextStreamer(tokenizer, skip_prompt=True, on_text=ready.append)
    steps = generate_steps(model, streamer=streamer, **generate_kwargs)
    if steps is None:
        raise ValueError("streaming is not supported with beam search (num_beams > 1)")
    for _ in steps:
        yield from _take(ready)
    yield from _take(ready)  # the streamer's end(): what was held back


def _take(ready: list[str]) -> Iterator[str]:
    pieces = [piece for piece in ready if piece]
    ready.clear()
    return iter(pieces)


def _stream_on_a_thread(model, tokenizer: Any, **generate_kwargs: Any) -> Iterator[str]:
    """Run `model.generate(**generate_kwargs)` in a worker thread and yield text pieces as they decode."""
    pieces: queue.Queue = queue.Queue()
    done = object()
    errors: list[BaseException] = []
    streamer = TextStreamer(tokenizer, skip_prompt=True, on_text=pieces.put)

    def work() -> None:
        try:
            model.generate(streamer=streamer, **generate_kwargs)
        except BaseException as e:  # re-raised in the consumer
            errors.append(e)
        finally:
            pieces.put(done)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while (piece := pieces.get()) is not done:
        if piece:
            yield piece
    worker.join()
    if errors:
        raise errors[0]
