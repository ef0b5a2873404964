"""Chat-format JSONL data and the training collator (label masking, dynamic right padding).

A line is `{"messages": [...], "images": ["a.jpg", ...]}` (TRL / OpenAI style); image paths are relative to the
JSONL file. `load_jsonl` validates every line before training starts and reports problems with line numbers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100
logger = logging.getLogger("idefics2.training")


class DataError(ValueError):
    """A problem with the training data, reported with the file and line number."""


@dataclass
class Sample:
    messages: list[dict[str, Any]]
    images: list[str]
    line: int
    source: str = ""
    num_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content) if isinstance(content, (list, tuple)) else []


def _check_line(record: Any, base: str, check_files: bool) -> tuple[list[dict], list[str]]:
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object with 'messages' (and 'images')")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    images = record.get("images", []) or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError("'images' must be a list of file paths")
    n_parts, n_assistant = 0, 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} must have a role of system, user or assistant")
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise ValueError(f"message {i} has no content (a string or a list of parts)")
        parts = _parts(message)
        n_parts += sum(1 for p in parts if isinstance(p, dict) and p.get("type") == "image")
        if message["role"] == "assistant":
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
            if not text.strip():
                raise ValueError(f"message {i} is an empty assistant turn")
            n_assistant += 1
    if n_assistant == 0:
        raise ValueError("no assistant turn: nothing to train on")
    if n_parts != len(images):
        raise ValueError(f"{n_parts} image part(s) in the messages but {len(images)} path(s) in 'images'")
    resolved = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in images]
    if check_files:
        for p in resolved:
            if not os.path.isfile(p):
                raise ValueError(f"image {p!r} does not exist")
    return messages, resolved


def load_jsonl(path: str, check_files: bool = True) -> list[Sample]:
    """Read and validate a chat JSONL file. Raises DataError listing every bad line (up to 20)."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    samples, errors = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                messages, images = _check_line(record, base, check_files)
            except (json.JSONDecodeError, ValueError) as e:
                errors.append(f"{path}:{number}: {e}")
                continue
            samples.append(Sample(messages=messages, images=images, line=number, source=path))
    if errors:
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} bad line(s) in {path}: " + "; ".join(errors[:20]) + more)
    if not samples:
        raise DataError(f"{path} has no samples")
    return samples


class ChatCollator:
    """Processor run per batch, RIGHT padding, labels with -100 on padding, image / fake-image tokens and every
    non-assistant turn (unless `train_on_all_text`). Assistant labels cover the answer text and its
    `<end_of_utterance>`, not the `Assistant:` header (it is part of the prompt at generation time).

    Assistant spans come from rendering the conversation prefix by prefix (the rendered prefix up to the
    generation prompt, and up to the end of the turn) and mapping characters to tokens with the tokenizer's
    offsets; the tokenization is the processor's own (checked)."""

    def __init__(self, processor: Any, train_on_all_text: bool = False, image_loader: Any = None) -> None:
        if processor.chat_template is None:
            raise ValueError("the processor has no chat template; fine-tuning on chat data needs one")
        self.processor = processor
        self.train_on_all_text = train_on_all_text
        self.image_loader = image_loader
        self.masked_ids = {processor.image_token_id, processor.fake_image_token_id}

    # -- text ------------------------------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(expanded prompt the tokenizer sees, character spans of the assistant turns in it)."""
        p = self.processor
        full = p.expand_image_tokens(p.apply_chat_template(messages))
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start_text = p.expand_image_tokens(p.apply_chat_template(messages[:i], add_generation_prompt=True)) \
                if i else p.expand_image_tokens(p.apply_chat_template([], add_generation_prompt=True))
            end_text = p.expand_image_tokens(p.apply_chat_template(messages[: i + 1]))
            if not (full.startswith(start_text) and full.startswith(end_text)):
                raise ValueError("the chat template does not render conversations prefix by prefix; "
                                 "use train_on_all_text (--train-on-all-text)")
            end = len(end_text.rstrip())
            spans.append((len(start_text), end))
        return full, spans

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids and labels of one conversation (no padding)."""
        text, spans = self.render(messages)
        encoding = self.processor.tokenizer.backend_tokenizer.encode(text, add_special_tokens=True)
        ids = list(encoding.ids)
        labels = []
        for token_id, (s, e) in zip(ids, encoding.offsets):
            keep = self.train_on_all_text or any(s < b and e > a for a, b in spans)
            if token_id in self.masked_ids or (e <= s and not self.train_on_all_text):
                keep = False
            labels.append(token_id if keep else IGNORE_INDEX)
        if self.train_on_all_text and ids and ids[0] == self.processor.tokenizer.bos_token_id:
            labels[0] = IGNORE_INDEX  # never a target anyway (no token before it)
        return ids, labels

    def num_tokens(self, messages: list[dict]) -> int:
        text = self.processor.expand_image_tokens(self.processor.apply_chat_template(messages))
        return len(self.processor.tokenizer.backend_tokenizer.encode(text, add_special_tokens=True).ids)

    # -- batches ---------------------------------------------------------------------------------------------
    def _load_image(self, path: str) -> Any:
        if self.image_loader is not None:
            return self.image_loader(path)
        from ..media import open_image

        return open_image(path)

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        p = self.processor
        texts, rows = [], []
        for sample in samples:
            texts.append(p.apply_chat_template(sample.messages))
            rows.append(self.encode(sample.messages))
        images = [[self._load_image(path) for path in s.images] for s in samples]
        has_images = any(images)
        batch = p(text=texts, images=images if has_images else None, padding="longest", padding_side="right",
                  return_tensors="pt")
        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for b, (row_ids, row_labels) in enumerate(rows):
            n = len(row_ids)
            if ids[b, :n].tolist() != row_ids:
                raise RuntimeError("internal error: the collator's tokenization differs from the processor's")
            labels[b, :n] = torch.tensor(row_labels)
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        out = {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}
        if has_images:
            out["pixel_values"] = batch["pixel_values"]
            out["pixel_attention_mask"] = batch["pixel_attention_mask"]
        return out


def filter_by_length(samples: list[Sample], collator: ChatCollator, max_length: int | None,
                     on_long: str = "drop") -> list[Sample]:
    """Count tokens (images included, no image decoding) and drop — or refuse — samples over `max_length`.
    Samples are never truncated: a cut inside an image block would break the image/feature alignment."""
    kept = []
    for sample in samples:
        sample.num_tokens = collator.num_tokens(sample.messages)
        if max_length is not None and sample.num_tokens > max_length:
            message = (f"{sample.source}:{sample.line}: {sample.num_tokens} tokens > --max-length {max_length}")
            if on_long == "error":
                raise DataError(message + " (samples are never truncated; raise --max-length or use --drop-long)")
            logger.warning("dropping %s", message)
            continue
        kept.append(sample)
    if not kept:
        raise DataError(f"every sample is longer than --max-length {max_length}")
    return kept


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is a target in some row (labels [batch, seq], -100 elsewhere).

    Passed as `logits_to_keep` with the full labels, the model computes the same loss from these positions'
    logits only: a chat batch's targets are its answers, so most positions (image tokens, prompts, padding)
    need no vocabulary projection, no softmax and no gradient through lm_head."""
    has_target = (labels[:, 1:] != IGNORE_INDEX).any(0)
    return has_target.nonzero().squeeze(1)
