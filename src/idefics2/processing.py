"""`Idefics2Processor`: prompts + images -> `input_ids`, `attention_mask`, `pixel_values`, `pixel_attention_mask`.

Parity target: transformers 5.24 `Idefics2Processor` (with the PIL image processor). Every `<image>` in a prompt
becomes `<fake_token_around_image>` + `<image>` x `image_seq_len` + `<fake_token_around_image>` (x5 groups with
image splitting), adjacent fake tokens are merged, and a space is inserted after a fake token followed by text,
as transformers 5 does. Chat templates render in a sandboxed jinja2 environment.

Deliberate differences from the reference, all where it would silently produce inconsistent inputs:
* `<image>` in the text without any images raises (the reference embeds the raw image tokens);
* `do_image_splitting` passed to a call also drives the text expansion (the reference expands by the attribute
  only, so the tokens and the image features disagree);
* a message `content` given as a plain string renders as one text part (the reference template drops it);
* numpy arrays / torch tensors are accepted as images (the reference processor raises TypeError).
"""

from __future__ import annotations

import json
import os
import re
from itertools import accumulate
from typing import Any

import numpy as np
import PIL.Image
import torch

from .batch_feature import BatchFeature
from .image_processing import (
    CALL_KEYS,
    PROCESSOR_CONFIG,
    Idefics2ImageProcessor,
    _resolve_directory,
    read_image_processor_config,
)
from .media import ImageLoadError, load_image_like_reference
from .tokenization import TOKENIZER_CONFIG, Idefics2Tokenizer

__all__ = ["BatchFeature", "Idefics2Processor"]

CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
IMAGE_PART_KEYS = ("image", "url", "path", "base64")  # where a chat image part may carry its image, in order


def _is_single_image(value: Any) -> bool:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim in (2, 3)
    return isinstance(value, (PIL.Image.Image, str, bytes, os.PathLike))


def _plain(value: Any) -> Any:
    """What a chat template may see: JSON-like data only; media objects become an inert placeholder (templates
    only test that an image key is present)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class Idefics2Processor:
    """Tokenizer + image processor for Idefics2 (parity with transformers 5.24 `Idefics2Processor`).

    `from_pretrained(path, legacy_tokenization=False, allow_remote_images=False, **image_overrides)` reads the hub
    (transformers 4) layout — `preprocessor_config.json`, `processor_config.json` with a `chat_template` key —
    or the transformers 5 layout (image processor nested in `processor_config.json`, `chat_template.jinja`),
    plus `chat_template.json` or a template in `tokenizer_config.json`.

    `legacy_tokenization=True` reproduces transformers 4.x ids (text after a special token gets a leading `▁`):
    `"<end_of_utterance>\\nAssistant:"` is `32002, 13, 7226, 11143, 28747` by default (transformers 5.24) and
    `32002, 28705, 13, 7226, 11143, 28747` with `legacy_tokenization=True` (transformers 4.x, the training-era
    tokenization, and a plain `tokenizers` load of tokenizer.json).

    Remote images (http/https) in calls or chat messages are only fetched with `allow_remote_images=True`.
    """

    def __init__(
        self,
        image_processor: Idefics2ImageProcessor,
        tokenizer: Idefics2Tokenizer,
        image_seq_len: int = 64,
        chat_template: str | None = None,
        allow_remote_images: bool = False,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_seq_len = int(image_seq_len)
        self.chat_template = chat_template
        self.allow_remote_images = allow_remote_images
        self.fake_image_token = FAKE_IMAGE_TOKEN
        self.image_token = IMAGE_TOKEN
        self.end_of_utterance_token = END_OF_UTTERANCE_TOKEN
        # As the reference: make sure the three tokens exist and are special (no-op on the published vocab).
        tokenizer.add_special_tokens([FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN])
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        self.fake_image_token_id = tokenizer.token_to_id(FAKE_IMAGE_TOKEN)
        self.end_of_utterance_token_id = tokenizer.token_to_id(END_OF_UTTERANCE_TOKEN)
        self._fake_before_text = re.compile(rf"{re.escape(FAKE_IMAGE_TOKEN)}(?=[^\s<])")
        self._template_cache: dict[str, Any] = {}

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"]

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        legacy_tokenization: bool = False,
        image_seq_len: int | None = None,
        chat_template: str | None = None,
        allow_remote_images: bool = False,
        **image_processor_overrides: Any,
    ) -> Idefics2Processor:
        """Load a processor from a checkpoint directory (or hub repo id). Extra keyword arguments override the
        image processor config (e.g. `do_image_splitting=False`, `max_image_pixels=...`)."""
        directory = _resolve_directory(os.fspath(directory))
        tokenizer = Idefics2Tokenizer.from_pretrained(directory, legacy_tokenization=legacy_tokenization)
        image_processor = Idefics2ImageProcessor.from_dict(
            read_image_processor_config(directory), allow_remote_images=allow_remote_images,
            **image_processor_overrides,
        )
        processor_config = {}
        path = os.path.join(directory, PROCESSOR_CONFIG)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                processor_config = json.load(handle)
        if image_seq_len is None:
            image_seq_len = processor_config.get("image_seq_len", 64)
        if chat_template is None:
            chat_template = _find_chat_template(directory, processor_config)
        return cls(image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=chat_template,
                   allow_remote_images=allow_remote_images)

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write the hub layout: tokenizer files, `preprocessor_config.json` and `processor_config.json` (with
        `image_seq_len` and the chat template), loadable by this class and by transformers 4 and 5."""
        os.makedirs(directory, exist_ok=True)
        paths = self.tokenizer.save_pretrained(directory)
        paths.append(self.image_processor.save_pretrained(directory))
        config: dict[str, Any] = {"image_seq_len": self.image_seq_len, "processor_class": "Idefics2Processor"}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        path = os.path.join(directory, PROCESSOR_CONFIG)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(dict(sorted(config.items())), handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        paths.append(path)
        return paths

    # ------------------------------------------------------------------------------------------- processing
    def expand_image_tokens(self, prompt: str, do_image_splitting: bool | None = None) -> str:
        """The prompt string the tokenizer sees: each `<image>` replaced by its token block."""
        if do_image_splitting is None:
            do_image_splitting = self.image_processor.do_image_splitting
        block = f"{FAKE_IMAGE_TOKEN}{IMAGE_TOKEN * self.image_seq_len}{FAKE_IMAGE_TOKEN}"
        if do_image_splitting:
            block *= 5
        expanded = prompt.replace(IMAGE_TOKEN, block).replace(FAKE_IMAGE_TOKEN * 2, FAKE_IMAGE_TOKEN)
        return self._fake_before_text.sub(FAKE_IMAGE_TOKEN + " ", expanded)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        **image_kwargs: Any,
    ) -> BatchFeature:
        """Process prompts and their images. `images`: one image, a flat list (split over the prompts in
        order of their `<image>` tokens), or one list per prompt. Image kwargs (`do_image_splitting`, `size`,
        `max_image_pixels`, ...) apply to this call only."""
        if text is None and images is None:
            raise ValueError("pass text, images or both")
        unknown = sorted(set(image_kwargs) - set(CALL_KEYS))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; image options are {sorted(CALL_KEYS)}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        splitting = image_kwargs.get("do_image_splitting", self.image_processor.do_image_splitting)
        outputs: dict[str, Any] = {}
        counts: list[int] = []

        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a non-empty list of strings")
            counts = [t.count(IMAGE_TOKEN) for t in texts]
            prompts = [self.expand_image_tokens(t, splitting) for t in texts]
            encoded = self.tokenizer(
                prompts, padding=padding, truncation=truncation, max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                add_special_tokens=add_special_tokens, return_attention_mask=return_attention_mask,
            )
            expected = [p.count(IMAGE_TOKEN) for p in prompts]
            found = [list(ids).count(self.image_token_id) for ids in encoded["input_ids"]]
            if found != expected:
                raise ValueError(
                    f"image token count mismatch between the prompts ({expected}) and input_ids ({found}), likely "
                    "from truncation: disable truncation or raise max_length"
                )
            outputs.update(encoded)
            if images is None and any(counts):
                sample = next(i for i, n in enumerate(counts) if n)
                raise ValueError(
                    f"sample {sample}: the text has {counts[sample]} <image> token(s) but no images were given"
                )

        if images is not None:
            nested = self._group_images(images, counts if text is not None else None)
            remote = image_kwargs.get("allow_remote_images", self.allow_remote_images)
            limit = image_kwargs.get("max_image_pixels", self.image_processor.max_image_pixels)
            loaded = [[self._load(image, i, j, remote, limit) for j, image in enumerate(sample)]
                      for i, sample in enumerate(nested)]
            if not any(loaded):
                raise ValueError("images were given but every sample's image list is empty")
            outputs.update(self.image_processor(loaded, **image_kwargs))
        return BatchFeature(outputs, tensor_type=return_tensors)

    def _group_images(self, images: Any, counts: list[int] | None) -> list[list[Any]]:
        """Images -> one list per sample, checked against the `<image>` counts of the prompts."""
        if _is_single_image(images):
            nested = [[images]]
        elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            nested = [list(images)]
        elif isinstance(images, (list, tuple)) and images and all(_is_single_image(im) for im in images):
            if counts is None:
                nested = [list(images)]
            else:
                if sum(counts) != len(images):
                    raise ValueError(
                        f"the prompts have {sum(counts)} <image> token(s) in total ({counts} per sample) but "
                        f"{len(images)} images were given"
                    )
                bounds = [0, *accumulate(counts)]
                nested = [list(images[bounds[i]:bounds[i + 1]]) for i in range(len(counts))]
        elif isinstance(images, (list, tuple)) and images and all(isinstance(s, (list, tuple)) for s in images):
            nested = [list(sample) for sample in images]
            for i, sample in enumerate(nested):
                for j, image in enumerate(sample):
                    if not _is_single_image(image):
                        raise TypeError(
                            f"sample {i}, image {j}: expected a PIL image, a 2-D/3-D array or tensor, a path or a "
                            f"base64 data URI, got {type(image).__name__}"
                            + (f" with shape {tuple(image.shape)}" if hasattr(image, "shape") else "")
                        )
        else:
            raise TypeError(
                "images must be an image, a list of images or a list of per-sample lists of images "
                f"(PIL, numpy, torch, path or data URI); got {type(images).__name__}"
                + (" (an empty list)" if isinstance(images, (list, tuple)) and not images else "")
            )
        if counts is not None:
            if len(nested) != len(counts):
                raise ValueError(f"{len(counts)} prompt(s) but images for {len(nested)} sample(s)")
            for i, (n_text, sample) in enumerate(zip(counts, nested)):
                if n_text != len(sample):
                    raise ValueError(
                        f"sample {i}: the text has {n_text} <image> token(s) but {len(sample)} image(s) were given"
                    )
        return nested

    @staticmethod
    def _load(image: Any, sample: int, index: int, allow_remote: bool, max_pixels: int | None) -> Any:
        """As the reference processor: PIL images and sources are opened, EXIF-rotated and `convert("RGB")`-ed
        (which drops alpha without compositing). Arrays and tensors go to the image processor unchanged."""
        if isinstance(image, (np.ndarray, torch.Tensor)):
            return image
        try:
            return load_image_like_reference(image, allow_remote=allow_remote, max_image_pixels=max_pixels)
        except ImageLoadError as exc:
            raise ImageLoadError(f"sample {sample}, image {index}: {exc}") from exc

    # ------------------------------------------------------------------------------------------ chat template
    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        allow_remote_images: bool | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> Any:
        """Render one conversation (or a list of them) with the chat template. With `tokenize=True`, image parts
        (`{"type": "image", "image": PIL | "path" | "data:..."}`, or the `url` / `path` / `base64` keys) are
        loaded and the prompt is processed: returns `input_ids`, or the whole BatchFeature with
        `return_dict=True`. URLs are fetched only with `allow_remote_images=True` (here or on the processor)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "this processor has no chat template (e.g. idefics2-8b-base); pass chat_template=... or write "
                "the prompt yourself, e.g. '<image>In this image, we see'"
            )
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(
            conversation[0], (list, tuple))
        conversations = [_normalize_messages(c) for c in (conversation if batched else [conversation])]
        compiled = self._compile(template)
        variables = {**self.tokenizer.special_tokens_map, **template_kwargs}
        prompts = [
            compiled.render(messages=_plain(c), add_generation_prompt=add_generation_prompt, **_plain(variables))
            for c in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [
            [part[key] for message in c if isinstance(message.get("content"), list)
             for part in message["content"] if isinstance(part, dict) and part.get("type") == "image"
             for key in IMAGE_PART_KEYS if key in part]
            for c in conversations
        ]
        kwargs = dict(processor_kwargs or {})
        bos = self.tokenizer.bos_token
        kwargs.setdefault("add_special_tokens", not (bos is not None and prompts[0].startswith(bos)))
        if allow_remote_images is not None:
            kwargs["allow_remote_images"] = allow_remote_images
        out = self(text=prompts if batched else prompts[0],
                   images=(images if batched else images[0]) if any(images) else None,
                   return_tensors=return_tensors, **kwargs)
        return out if return_dict else out["input_ids"]

    def _compile(self, template: str) -> Any:
        compiled = self._template_cache.get(template)
        if compiled is None:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
                       separators: Any = None, sort_keys: bool = False) -> str:
                return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            # Same environment settings as transformers (templates from checkpoints are untrusted code).
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            compiled = env.from_string(template)
            self._template_cache[template] = compiled
        return compiled

    # ---------------------------------------------------------------------------------------------- decoding
    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str | list[str]:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def __repr__(self) -> str:
        return (f"Idefics2Processor(image_seq_len={self.image_seq_len}, tokenizer={self.tokenizer!r}, "
                f"image_processor={self.image_processor!r})")


def _normalize_messages(conversation: Any) -> list[dict[str, Any]]:
    """Messages as the template expects them: None-valued keys dropped, OpenAI `image_url` parts turned into
    image parts, and a plain-string content turned into one text part."""
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"a conversation must be a list of messages, got {type(conversation).__name__}")
    messages = []
    for index, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message:
            raise TypeError(f"message {index} must be a dict with 'role' and 'content', got {message!r:.80}")
        message = {key: value for key, value in message.items() if value is not None}
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = [{"type": "text", "text": content}]
        elif isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url" and "image_url" in part:
                    url = part["image_url"]
                    parts.append({"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url})
                else:
                    parts.append(part)
            message["content"] = parts
        messages.append(message)
    return messages


def _find_chat_template(directory: str, processor_config: dict[str, Any]) -> str | None:
    """The chat template wherever checkpoints keep it: chat_template.jinja (transformers 5), chat_template.json,
    the processor_config.json key (hub idefics2), or tokenizer_config.json."""
    path = os.path.join(directory, CHAT_TEMPLATE_JINJA)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    for source in (_template_in_json(os.path.join(directory, CHAT_TEMPLATE_JSON)),
                   processor_config.get("chat_template"),
                   _template_in_json(os.path.join(directory, TOKENIZER_CONFIG))):
        if isinstance(source, str):
            return source
    return None


def _template_in_json(path: str) -> Any:
    """The `chat_template` key of a JSON file, or None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("chat_template")

