"""Continuous-batching engine: one background thread owns the model and decodes all active requests together.

Between decode steps, queued requests are prefilled straight into a free slot of a `SlotKVCache` and join
the running batch; finished, stopped or cancelled requests leave at once and free their slot. Prefill,
decode step, logits processing and token choice are the ones `generate` uses (one decode path). Image
features are kept in a byte-bounded LRU keyed by the image content and processing settings, so an image
seen before (another request, an earlier turn) skips the vision tower and the connector.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import SlotKVCache
from .generation import (
    GenerationConfig,
    StopStrings,
    choose_tokens,
    decode_step,
    prefill,
    process_logits,
    static_bad_words_mask,
)
from .structured import Constraint, GrammarEngine, RowMatcher


class FeatureCache:
    """LRU of image features [n_sub_images, n_latents, hidden], bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self.lock:
            value = self.entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()


@dataclass
class ImageInput:
    """One image of a request: its processed pixels [1, n_sub, 3, H, W] (+ mask) and a cache key (or None)."""

    key: str | None
    pixel_values: torch.Tensor | None = None
    pixel_attention_mask: torch.Tensor | None = None


@dataclass
class EngineRequest:
    input_ids: torch.Tensor  # [T] prompt with image tokens expanded
    config: GenerationConfig
    images: list[ImageInput] = field(default_factory=list)
    seed: int | None = None
    constraint: Constraint | None = None  # JSON schema / regex / choices the output must match
    on_token: Callable[[int], None] | None = None  # called on the engine thread for each new token
    # Filled in by the engine.
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


@dataclass
class _Row:
    request: EngineRequest
    ids: torch.Tensor  # prompt + generated so far
    config: GenerationConfig
    generator: torch.Generator | None
    stop: StopStrings | None
    bad_mask: torch.Tensor | None
    eos: set[int]
    budget: int
    matcher: RowMatcher | None = None


class EngineMetrics:
    def __init__(self) -> None:
        self.requests_total = collections.Counter()  # by finish reason
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.decode_steps = 0
        self.largest_batch = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        window = [(t, n) for t, n in self.recent if now - t < 10.0]
        if len(window) < 2:
            return 0.0
        span = window[-1][0] - window[0][0]
        return sum(n for _, n in window[1:]) / span if span > 0 else 0.0


class Engine:
    def __init__(self, model, tokenizer: Any = None, max_batch: int = 8, max_tokens_per_request: int = 4096,
                 feature_cache_bytes: int = 512 * 2**20) -> None:
        self.model = model
        self.tokenizer = tokenizer
        text = model.config.text_config
        self.cache = SlotKVCache(text.num_hidden_layers, max_batch, text.num_key_value_heads, text.head_dim,
                                 max_tokens_per_request, model.dtype, model.device)
        self.max_tokens_per_request = max_tokens_per_request
        self.features = FeatureCache(feature_cache_bytes)
        self.metrics = EngineMetrics()
        self.rows: list[_Row] = []
        self.pending: queue.Queue[EngineRequest] = queue.Queue()
        self._in_hand = 0  # taken off `pending` and not yet a row (prefilling), still counted as queued
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="idefics2-engine", daemon=True)
        self._started = False

    # ---- public ------------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    @property
    def queue_depth(self) -> int:
        return self.pending.qsize() + self._in_hand

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def submit(self, request: EngineRequest) -> EngineRequest:
        if self._stopping.is_set():
            raise RuntimeError("the engine is shutting down")
        total = int(request.input_ids.numel()) + (request.config.max_new_tokens or 0)
        if total > self.max_tokens_per_request:
            raise ValueError(
                f"prompt ({request.input_ids.numel()} tokens) + max_new_tokens ({request.config.max_new_tokens}) "
                f"exceeds the per-request limit of {self.max_tokens_per_request} tokens"
            )
        request.submitted_at = time.perf_counter()
        self.pending.put(request)
        return request

    def generate(self, request: EngineRequest, timeout: float | None = None) -> EngineRequest:
        self.submit(request).wait(timeout)
        return request

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting; let running requests finish for up to `timeout` s, then cancel the rest."""
        self._stopping.set()
        deadline = time.perf_counter() + timeout
        while (self.rows or not self.pending.empty()) and time.perf_counter() < deadline and self._started:
            time.sleep(0.01)
        for row in list(self.rows):
            row.request.cancel()
        while not self.pending.empty():
            self._finish_unadmitted(self.pending.get_nowait(), "cancelled")
        if self._started:
            self._thread.join(timeout=5.0)

    # ---- engine thread -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                if self._stopping.is_set() and not self.rows and self.pending.empty():
                    return
                self._admit(block=not self.rows)
                if self.rows:
                    self._step()

    def _admit(self, block: bool = False) -> None:
        """Start pending requests while the batch has room; when `block`, wait a moment for the first one."""
        while len(self.rows) < self.cache.max_batch:
            try:
                request = self.pending.get(timeout=0.05) if block else self.pending.get_nowait()
            except queue.Empty:
                return
            block = False
            self._in_hand = 1
            try:
                if request.cancelled.is_set():
                    self._finish_unadmitted(request, "cancelled")
                    continue
                self._start(request)
            except Exception as e:  # a bad request must not take the engine down
                request.error = f"{type(e).__name__}: {e}"
                self._finish_unadmitted(request, "error")
            finally:
                self._in_hand = 0

    def grammar(self, config: GenerationConfig) -> GrammarEngine:
        """The grammar engine for this tokenizer (compiled grammars are cached there)."""
        if self.tokenizer is None:
            raise ValueError("constrained requests need the engine to have the tokenizer")
        return GrammarEngine.for_tokenizer(self.tokenizer, self.model.config.vocab_size, tuple(config.eos_ids))

    def _image_features(self, request: EngineRequest) -> torch.Tensor | None:
        parts = []
        for image in request.images:
            features = self.features.get(image.key) if image.key else None
            if features is None:
                if image.pixel_values is None:
                    raise ValueError("image not in the feature cache and no pixels given")
                mask = image.pixel_attention_mask
                features, _ = self.model.model.get_image_features(
                    image.pixel_values.to(self.model.device), None if mask is None else mask.to(self.model.device)
                )
                if image.key:
                    self.features.put(image.key, features)
            parts.append(features)
        return torch.cat(parts) if parts else None

    def _start(self, request: EngineRequest) -> None:
        model, config = self.model, request.config
        ids = request.input_ids.reshape(-1).to(model.device)
        features = self._image_features(request)
        slot = self.cache.active
        view = self.cache.slot_view(slot)
        logits = prefill(model, ids[None], None, features, view)
        self.cache.admit(view)
        generator = None
        if config.do_sample:
            generator = torch.Generator(device=model.device)
            generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        row = _Row(
            request=request, ids=ids, config=config, generator=generator,
            stop=StopStrings(config.stop_strings, self.tokenizer) if config.stop_strings else None,
            bad_mask=static_bad_words_mask(config, model.config.vocab_size, model.device),
            eos=set(config.eos_ids),
            budget=config.max_new_tokens if config.max_new_tokens is not None else GenerationConfig.DEFAULT_MAX_NEW_TOKENS,
            matcher=self.grammar(config).matcher(request.constraint) if request.constraint else None,
        )
        self.rows.append(row)
        self.metrics.prompt_tokens += int(ids.numel())
        self._emit(len(self.rows) - 1, logits[0])

    def _step(self) -> None:
        n = len(self.rows)
        lengths = self.cache.lengths[:n]
        tokens = torch.stack([row.ids[-1] for row in self.rows])
        width = int(lengths.max()) + 1
        mask = (torch.arange(width, device=lengths.device)[None, :] <= lengths[:, None]).long()
        logits = decode_step(self.model, tokens, mask, self.cache, position_ids=lengths[:, None].clone())
        self.metrics.decode_steps += 1
        self.metrics.largest_batch = max(self.metrics.largest_batch, n)
        # Walk backwards: releasing a slot moves the last row into it.
        for index in reversed(range(n)):
            self._emit(index, logits[index])

    def _emit(self, index: int, logits: torch.Tensor) -> None:
        """Choose row `index`'s next token from its logits, deliver it, and retire the row if it is done."""
        row = self.rows[index]
        request = row.request
        if request.cancelled.is_set():
            self._retire(index, "cancelled")
            return
        generated = len(request.tokens)
        allowed = row.matcher.allowed()[None].to(logits.device) if row.matcher is not None else None
        scores = process_logits(logits[None], row.ids[None], row.config, generated, row.bad_mask, allowed)
        token = int(choose_tokens(scores, row.config, row.generator)[0])
        if row.matcher is not None:
            row.matcher.advance(token)
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.ttft_sum += now - request.submitted_at
            self.metrics.ttft_count += 1
        request.tokens.append(token)
        row.ids = torch.cat([row.ids, row.ids.new_tensor([token])])
        self.metrics.generated_tokens += 1
        self.metrics.recent.append((now, 1))
        if request.on_token is not None:
            request.on_token(token)
        grammar_done = row.matcher is not None and row.matcher.finished
        if grammar_done or token in row.eos or (
            row.stop is not None and bool(row.stop(row.ids[None, -len(request.tokens):])[0])
        ):
            self._retire(index, "stop")
        elif len(request.tokens) >= row.budget or int(self.cache.lengths[index]) + 1 >= self.cache.capacity:
            self._retire(index, "length")

    def _retire(self, index: int, reason: str) -> None:
        row = self.rows[index]
        moved = self.cache.release(index)
        if moved is not None:
            self.rows[index] = self.rows[moved]
        self.rows.pop()
        self._finish_unadmitted(row.request, reason)

    def _finish_unadmitted(self, request: EngineRequest, reason: str) -> None:
        request.finish_reason = reason
        request.finished_at = time.perf_counter()
        self.metrics.requests_total[reason] += 1
        request.done.set()
