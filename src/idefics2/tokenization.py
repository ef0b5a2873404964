"""`Idefics2Tokenizer`: the Llama/Mistral SentencePiece-BPE tokenizer of Idefics2 over the `tokenizers` library.

Two tokenization behaviours exist for the published files, and they differ right after special tokens:

* **transformers 5.x** (the default here, `legacy_tokenization=False`): `LlamaTokenizer` ignores the
  `tokenizer.json` normalizer and pre-tokenizes with `Metaspace(replacement="▁", prepend_scheme="first",
  split=False)` (because the hub `tokenizer_config.json` says `legacy: false`), so only the very start of the
  text gets a `▁`, and text right after a special token gets none::

      "<end_of_utterance>\\nAssistant:"  ->  32002, 13, 7226, 11143, 28747

* **transformers 4.x / plain `tokenizers`** (`legacy_tokenization=True`), with which the idefics2 checkpoints
  were trained: the `tokenizer.json` normalizer (`Prepend("▁")` + `Replace(" ", "▁")`) runs on every piece of
  text between special tokens, so each one gets a leading `▁` (id 28705 before a newline)::

      "<end_of_utterance>\\nAssistant:"  ->  32002, 28705, 13, 7226, 11143, 28747

  Pick it with `Idefics2Processor.from_pretrained(path, legacy_tokenization=True)` (or on this class) to
  reproduce the ids of the training-era code.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors

from .batch_feature import BatchFeature

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
# transformers treats a model_max_length at or above this as "no limit".
NO_LIMIT = int(1e20)

SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_content(value: Any) -> str | None:
    """A special token entry as stored in the configs: a string or an AddedToken-like dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _metaspace_decoder(strip_prefix_space: bool) -> decoders.Decoder:
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def _as_id_list(ids: Any) -> list[int] | list[list[int]]:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().tolist()
    elif isinstance(ids, np.ndarray):
        ids = ids.tolist()
    elif isinstance(ids, (int, np.integer)):
        ids = [int(ids)]
    return ids


class Idefics2Tokenizer:
    """Tokenizer with the API idefics2 users need: `__call__` (padding, truncation, tensors), `encode`, `decode`,
    `batch_decode`, `convert_tokens_to_ids`, `convert_ids_to_tokens`, `tokenize`, special-token ids and `len`.

    Built from `tokenizer.json` + `tokenizer_config.json` (+ `special_tokens_map.json`), in either the hub
    (transformers 4) or the transformers 5 layout. `legacy_tokenization` selects the behaviour after special
    tokens (see the module docstring): False matches transformers 5.24 (default), True matches transformers 4.x
    and the plain `tokenizer.json` pipeline. Padding is on the left with `<unk>` (id 0) for the published files.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        tokenizer_json: dict[str, Any],
        config: dict[str, Any] | None = None,
        special_tokens_map: dict[str, Any] | None = None,
        legacy_tokenization: bool = False,
    ) -> None:
        self._source_json = tokenizer_json
        self._config = dict(config or {})
        special_tokens_map = special_tokens_map or {}
        self.legacy_tokenization = legacy_tokenization

        def setting(key: str, default: Any = None) -> Any:
            if key in self._config:
                return self._config[key]
            return special_tokens_map.get(key, default)

        self.bos_token: str | None = _token_content(setting("bos_token", "<s>"))
        self.eos_token: str | None = _token_content(setting("eos_token", "</s>"))
        self.unk_token: str | None = _token_content(setting("unk_token", "<unk>"))
        self.pad_token: str | None = _token_content(setting("pad_token"))
        extra = setting("additional_special_tokens") or setting("extra_special_tokens") or []
        if isinstance(extra, dict):  # transformers 5 may store named extra tokens
            extra = list(extra.values())
        self._additional_special_tokens: list[str] = [_token_content(t) for t in extra]
        self.padding_side: str = self._config.get("padding_side", "left")  # LlamaTokenizer's default
        self.truncation_side: str = self._config.get("truncation_side", "right")
        self.model_max_length: int = int(self._config.get("model_max_length", NO_LIMIT * 10))
        self.add_bos_token: bool = bool(self._config.get("add_bos_token", True))
        self.add_eos_token: bool = bool(self._config.get("add_eos_token", False))
        self.clean_up_tokenization_spaces = bool(self._config.get("clean_up_tokenization_spaces", False))
        self.chat_template: str | None = self._config.get("chat_template") if isinstance(
            self._config.get("chat_template"), str) else None

        self._tokenizer = self._build_backend()
        # Special tokens named in the configs but missing from tokenizer.json are added, as transformers does.
        missing = [t for t in [self.bos_token, self.eos_token, self.unk_token, self.pad_token,
                               *self._additional_special_tokens] if t is not None and self.token_to_id(t) is None]
        if missing:
            self.add_special_tokens(list(dict.fromkeys(missing)))

    # -------------------------------------------------------------------------------------------- building
    def _build_backend(self) -> Tokenizer:
        source = self._source_json
        has_legacy_normalizer = source.get("normalizer") is not None
        if self.legacy_tokenization:
            backend = Tokenizer.from_str(json.dumps(source))
            if not has_legacy_normalizer:
                # A transformers-5-saved file (Metaspace pre-tokenizer, no normalizer): rebuild the 4.x pipeline.
                backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
                backend.pre_tokenizer = None
                backend.decoder = _metaspace_decoder(strip_prefix_space=True)
            self._apply_post_processor_rule(backend)
            return backend
        # transformers 5.24 LlamaTokenizer: keeps the vocabulary, merges, added tokens and post-processor of the
        # file, builds its own BPE model (no unk token, byte fallback), drops the normalizer and pre-tokenizes
        # with Metaspace. prepend_scheme follows `legacy` and `add_prefix_space` from tokenizer_config.json.
        rebuilt = dict(source)
        model = dict(source["model"])
        if model.get("type") != "BPE":
            raise ValueError(f"expected a BPE tokenizer.json (Llama/Mistral), got model type {model.get('type')!r}")
        model.update(unk_token=None, fuse_unk=True, byte_fallback=True, dropout=None)
        rebuilt["model"] = model
        rebuilt["normalizer"] = None
        rebuilt["pre_tokenizer"] = None
        rebuilt["decoder"] = None
        rebuilt["truncation"] = None
        rebuilt["padding"] = None
        backend = Tokenizer.from_str(json.dumps(rebuilt))
        add_prefix_space = self._config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        legacy = bool(self._config.get("legacy", False))
        scheme = ("always" if legacy else "first") if add_prefix_space else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        backend.decoder = _metaspace_decoder(strip_prefix_space=add_prefix_space)
        self._apply_post_processor_rule(backend)
        return backend

    def _apply_post_processor_rule(self, backend: Tokenizer) -> None:
        """transformers rebuilds the BOS/EOS template when tokenizer_config.json sets add_bos_token or
        add_eos_token (the hub files do), and otherwise keeps the one in tokenizer.json."""
        explicit_bos_eos = "add_bos_token" in self._config or "add_eos_token" in self._config
        if explicit_bos_eos or backend.post_processor is None:
            if not explicit_bos_eos:
                self.add_bos_token = self.add_eos_token = False
            self._update_post_processor(backend)

    def _update_post_processor(self, backend: Tokenizer) -> None:
        """BOS/EOS template from add_bos_token / add_eos_token, like transformers' update_post_processor."""
        bos, eos = self.bos_token, self.eos_token
        add_bos = self.add_bos_token and bos is not None
        add_eos = self.add_eos_token and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = []
        if add_bos:
            special.append((bos, backend.token_to_id(bos)))
        if add_eos:
            special.append((eos, backend.token_to_id(eos)))
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, legacy_tokenization: bool = False, **config_overrides: Any
    ) -> Idefics2Tokenizer:
        """Load from a directory holding `tokenizer.json` (and usually `tokenizer_config.json`,
        `special_tokens_map.json`). `config_overrides` replace tokenizer_config.json keys (e.g.
        `padding_side="right"`)."""
        from .image_processing import _resolve_directory

        directory = _resolve_directory(os.fspath(directory))
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: idefics2 needs the fast-tokenizer file tokenizer.json (tokenizer.model alone "
                "is not supported)"
            )
        with open(path, encoding="utf-8") as handle:
            tokenizer_json = json.load(handle)
        config = _read_json(os.path.join(directory, TOKENIZER_CONFIG))
        config.update(config_overrides)
        special_tokens_map = _read_json(os.path.join(directory, SPECIAL_TOKENS_MAP))
        tokenizer = cls(tokenizer_json, config, special_tokens_map, legacy_tokenization=legacy_tokenization)
        tokenizer.name_or_path = directory
        return tokenizer

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write `tokenizer.json` (the source pipeline, so transformers 4 and 5 both load it as published),
        `tokenizer_config.json` and `special_tokens_map.json`."""
        os.makedirs(directory, exist_ok=True)
        paths = [os.path.join(directory, name) for name in (TOKENIZER_FILE, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)]
        with open(paths[0], "w", encoding="utf-8") as handle:
            json.dump(self._source_json, handle, ensure_ascii=False)
        config = dict(self._config)
        for role in SPECIAL_ROLES:
            config[role] = getattr(self, role)
        config["additional_special_tokens"] = list(self.additional_special_tokens)
        config.pop("extra_special_tokens", None)
        config["padding_side"] = self.padding_side
        config.setdefault("tokenizer_class", "LlamaTokenizer")
        config["added_tokens_decoder"] = {
            str(entry["id"]): {k: v for k, v in entry.items() if k != "id"} for entry in self._source_json["added_tokens"]
        }
        with open(paths[1], "w", encoding="utf-8") as handle:
            json.dump(dict(sorted(config.items())), handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        special_map = {role: getattr(self, role) for role in SPECIAL_ROLES if getattr(self, role) is not None}
        special_map["additional_special_tokens"] = list(self.additional_special_tokens)
        with open(paths[2], "w", encoding="utf-8") as handle:
            json.dump(special_map, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        source_dir = getattr(self, "name_or_path", None)
        if source_dir and os.path.isfile(os.path.join(source_dir, ADDED_TOKENS_FILE)):
            shutil.copyfile(os.path.join(source_dir, ADDED_TOKENS_FILE), os.path.join(directory, ADDED_TOKENS_FILE))
        return paths

    # ------------------------------------------------------------------------------------------ vocabulary
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Ids of tokens; an unknown token maps to the unk id (like transformers)."""
        if isinstance(tokens, str):
            found = self._tokenizer.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self._tokenizer.id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in _as_id_list(ids) if int(i) not in special]

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def additional_special_tokens(self) -> list[str]:
        return list(self._additional_special_tokens)

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return [self._id(token) for token in self._additional_special_tokens]

    @property
    def all_special_tokens(self) -> list[str]:
        named = [getattr(self, role) for role in SPECIAL_ROLES]
        return list(dict.fromkeys(t for t in [*named, *self._additional_special_tokens] if t is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._id(token) for token in self.all_special_tokens]

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """Named special tokens (passed to chat templates as variables, like transformers does)."""
        mapping: dict[str, Any] = {role: getattr(self, role) for role in SPECIAL_ROLES if getattr(self, role)}
        if self._additional_special_tokens:
            mapping["additional_special_tokens"] = list(self._additional_special_tokens)
        return mapping

    def add_special_tokens(self, tokens: list[str]) -> int:
        """Register tokens as special (never split, `normalized=False`, dropped by `skip_special_tokens`),
        adding them to the vocabulary when missing. Returns how many new ids were created."""
        added = 0
        for token in tokens:
            if token not in self._additional_special_tokens and token not in [getattr(self, r) for r in SPECIAL_ROLES]:
                self._additional_special_tokens.append(token)
            if self._tokenizer.token_to_id(token) is None:
                added += self._tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
                new_id = self._tokenizer.token_to_id(token)
                self._source_json.setdefault("added_tokens", []).append({
                    "id": new_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                    "normalized": False, "special": True,
                })
        return added

    # -------------------------------------------------------------------------------------------- encoding
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes one string, got {type(text).__name__}; use __call__ for batches")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
    ) -> BatchFeature:
        """Tokenize a string or a batch of strings. `padding`: False / True ("longest") / "longest" /
        "max_length"; `truncation`: True / "longest_first" / "only_first" with `max_length`. A single string
        without `return_tensors` gives flat lists, as in transformers."""
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        for i, item in enumerate(texts):
            if not isinstance(item, str):
                raise TypeError(f"text[{i}] must be a string, got {type(item).__name__}")
        pad_length, truncate_to = self._resolve_lengths(padding, truncation, max_length)
        if truncate_to is not None:
            self._tokenizer.enable_truncation(
                max_length=truncate_to, stride=0, strategy="longest_first", direction=self.truncation_side
            )
        else:
            self._tokenizer.no_truncation()
        if padding not in (False, None, "do_not_pad"):
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token, but this tokenizer has none (set pad_token)")
            side = padding_side or self.padding_side
            if side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
            self._tokenizer.enable_padding(
                direction=side, pad_id=self.pad_token_id, pad_token=self.pad_token, pad_type_id=0,
                length=pad_length, pad_to_multiple_of=pad_to_multiple_of,
            )
        else:
            self._tokenizer.no_padding()
        try:
            encodings = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        finally:
            self._tokenizer.no_padding()
            self._tokenizer.no_truncation()
        data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if not batched and return_tensors is None:
            data = {key: value[0] for key, value in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)

    def _resolve_lengths(
        self, padding: bool | str, truncation: bool | str | None, max_length: int | None
    ) -> tuple[int | None, int | None]:
        if padding not in (False, True, None, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if truncation not in (None, False, True, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"truncation must be a bool, 'longest_first' or 'only_first', got {truncation!r}")
        limit = max_length if max_length is not None else (
            self.model_max_length if self.model_max_length < NO_LIMIT else None)
        pad_length = None
        if padding == "max_length":
            if limit is None:
                raise ValueError("padding='max_length' needs max_length")
            pad_length = limit
        truncate = truncation not in (None, False, "do_not_truncate")
        return pad_length, (limit if truncate else None)

    # -------------------------------------------------------------------------------------------- decoding
    def decode(
        self, token_ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str | list[str]:
        """Ids -> text. Accepts a list, numpy array or tensor; a 2-D input decodes each row (a list of str)."""
        ids = _as_id_list(token_ids)
        if ids and isinstance(ids[0], list):
            return self.batch_decode(ids, skip_special_tokens=skip_special_tokens)
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        # clean_up_tokenization_spaces is False for idefics2 (and transformers skips it for BPE anyway).
        return text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **_: Any) -> list[str]:
        rows = _as_id_list(sequences)
        return self._tokenizer.decode_batch([[int(i) for i in row] for row in rows],
                                            skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        mode = "transformers-4 legacy" if self.legacy_tokenization else "transformers-5"
        return (f"Idefics2Tokenizer(vocab={len(self)}, padding_side={self.padding_side!r}, pad={self.pad_token!r}, "
                f"tokenization={mode})")
