"""Text generation: greedy, sampling and beam search over a preallocated KV cache.

The images are encoded once, at prefill. Each decode step embeds one new token per row, writes its key and
value into the cache in place and runs only that position through `lm_head`. Logits processing follows
transformers' order and semantics (repetition penalty, bad words, min new tokens, then temperature, top-k,
top-p, min-p when sampling), so greedy outputs are token-identical to the reference.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import KVCache
from .structured import GrammarEngine, allowed_mask, constraints_for_rows

GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass
class GenerationConfig:
    """Generation settings; unset fields take transformers' model-agnostic defaults."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    bad_words_ids: list[list[int]] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    output_scores: bool = False
    return_dict_in_generate: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    DEFAULT_MAX_NEW_TOKENS = 20  # transformers' `max_length=20`, read as new tokens when nothing is set

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GenerationConfig:
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: data.pop(k) for k in list(data) if k in names}
        return cls(**known, extra=data)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GenerationConfig:
        path = os.path.join(directory, GENERATION_CONFIG_NAME)
        if not os.path.isfile(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        defaults = GenerationConfig()
        for f in dataclasses.fields(self):
            if f.name != "extra" and getattr(self, f.name) != getattr(defaults, f.name):
                out[f.name] = getattr(self, f.name)
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, GENERATION_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def updated(self, **overrides: Any) -> GenerationConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"generate() got unknown arguments: {sorted(unknown)}")
        config = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        config.validate()
        return config

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def validate(self) -> None:
        def positive(name: str, value: Any, allow_zero: bool = False) -> None:
            if value is not None and (not isinstance(value, int) or value < (0 if allow_zero else 1)):
                raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {value!r}")

        positive("max_new_tokens", self.max_new_tokens, allow_zero=True)
        positive("max_length", self.max_length)
        positive("min_new_tokens", self.min_new_tokens, allow_zero=True)
        positive("num_beams", self.num_beams)
        positive("num_return_sequences", self.num_return_sequences)
        positive("top_k", self.top_k, allow_zero=True)
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_return_sequences > self.num_beams and not self.do_sample and self.num_beams > 1:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} must be <= num_beams={self.num_beams}"
            )
        if self.num_return_sequences > 1 and not self.do_sample and self.num_beams == 1:
            raise ValueError("num_return_sequences > 1 needs do_sample=True or num_beams >= num_return_sequences")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None

    def __getitem__(self, key: str | int):
        return getattr(self, key) if isinstance(key, str) else (self.sequences, self.scores)[key]


# ---- logits processing (transformers' order) -------------------------------------------------------------------
def apply_repetition_penalty(scores: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Every token already present (prompt included) gets its logit divided (>0) or multiplied (<0)."""
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def bad_words_mask(ids: torch.Tensor, bad_words_ids: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """[B, V] True where emitting the token would complete a banned sequence."""
    mask = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    for words in bad_words_ids:
        if len(words) == 1:
            mask[:, words[0]] = True
        elif ids.shape[1] >= len(words) - 1:
            prefix = torch.tensor(words[:-1], device=ids.device)
            hit = (ids[:, ids.shape[1] - len(words) + 1:] == prefix).all(dim=1)
            mask[hit, words[-1]] = True
    return mask


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, scores.shape[-1])
    threshold = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < threshold, -math.inf)


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, -math.inf)


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = scores.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return scores.masked_fill(remove, -math.inf)


def process_logits(
    scores: torch.Tensor, ids: torch.Tensor, config: GenerationConfig, new_tokens: int,
    bad_mask_static: torch.Tensor | None, allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """All logits processors for one step. `scores` [B, V] float32, `ids` [B, T] prompt + generated so far,
    `allowed` [B, V] a grammar's token mask (applied before the sampling filters, so they choose among
    allowed tokens only)."""
    if config.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, ids, config.repetition_penalty)
    if config.bad_words_ids:
        if bad_mask_static is not None:
            scores = scores.masked_fill(bad_mask_static, -math.inf)
        multi = [w for w in config.bad_words_ids if len(w) > 1]
        if multi:
            scores = scores.masked_fill(bad_words_mask(ids, multi, scores.shape[-1]), -math.inf)
    if new_tokens < config.min_new_tokens and config.eos_ids:
        scores = scores.clone()
        scores[:, config.eos_ids] = -math.inf
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            scores = scores / config.temperature
        if config.top_k:
            scores = top_k_filter(scores, config.top_k)
        if config.top_p < 1.0:
            scores = top_p_filter(scores, config.top_p)
        if config.min_p:
            scores = min_p_filter(scores, config.min_p)
    return scores


def choose_tokens(scores: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Processed scores [B, V] -> next token per row: argmax, or a draw from softmax when sampling."""
    if config.do_sample:
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


# ---- stopping ---------------------------------------------------------------------------------------------------
class StopStrings:
    """Stops a row once its generated text contains one of the strings (needs the tokenizer to decode)."""

    def __init__(self, stop_strings: str | list[str], tokenizer: Any) -> None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass tokenizer=processor.tokenizer to generate()")
        self.strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.tokenizer = tokenizer
        # A stop string spans at most len(s) tokens (every token decodes to >= 1 character), plus one of slack.
        self.window = max(len(s) for s in self.strings) + 1

    def __call__(self, generated: torch.Tensor) -> torch.Tensor:
        hits = []
        for row in generated[:, -self.window:].tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=False)
            hits.append(any(s in text for s in self.strings))
        return torch.tensor(hits, dtype=torch.bool, device=generated.device)


# ---- the loop ---------------------------------------------------------------------------------------------------
def resolve_config(model, generation_config: GenerationConfig | dict | None, kwargs: dict) -> GenerationConfig:
    if generation_config is None:
        base = getattr(model, "generation_config", None)
        generation_config = base if isinstance(base, GenerationConfig) else GenerationConfig.from_dict(base)
    elif isinstance(generation_config, dict):
        generation_config = GenerationConfig.from_dict(generation_config)
    config = generation_config.updated(**kwargs)
    if config.pad_token_id is None:
        pad = model.config.text_config.pad_token_id
        config.pad_token_id = pad if pad is not None else (config.eos_ids[0] if config.eos_ids else 0)
    return config


def _budget(config: GenerationConfig, prompt_len: int) -> int:
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is not None:
        return max(0, config.max_length - prompt_len)
    return GenerationConfig.DEFAULT_MAX_NEW_TOKENS


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | GenerateOutput:
    """transformers-compatible generate: returns prompt + new ids [B * num_return_sequences, T]. Arguments:
    attention_mask, pixel_values, pixel_attention_mask, image_hidden_states, generation_config (or its fields),
    streamer, tokenizer, generator or seed, json_schema / regex / choices."""
    return _generate(model, input_ids, stepwise=False, **kwargs)


@torch.inference_mode()
def generate_steps(model, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Iterator[torch.Tensor] | None:
    """generate() as an iterator the caller drives on its own thread: each next() runs one step (the first one
    the prefill) and yields that step's new tokens [B]; `streamer` is fed as generate() feeds it. Inference mode is
    on inside each step only, not in the caller's code between them. None for beam search (it is not stepwise)."""
    return _generate(model, input_ids, stepwise=True, **kwargs)


def _generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    image_hidden_states: torch.Tensor | None = None,
    generation_config: GenerationConfig | dict | None = None,
    streamer: Any = None,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    stepwise: bool = False,
    **kwargs: Any,
):
    if input_ids is None:
        raise ValueError("generate() needs input_ids (build them with the processor)")
    kwargs.pop("use_cache", None)
    grammar_kwargs = {k: kwargs.pop(k) for k in ("json_schema", "regex", "choices") if k in kwargs}
    config = resolve_config(model, generation_config, kwargs)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if seed is not None and generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)

    # Encode the images once, for the original rows; expanded rows reuse the features.
    features = image_hidden_states
    if pixel_values is not None:
        features, counts = model.model.get_image_features(
            pixel_values.to(device), None if pixel_attention_mask is None else pixel_attention_mask.to(device)
        )
        model.model.check_image_tokens(input_ids, counts)  # prefill sees the features, not the counts
    constraints = constraints_for_rows(input_ids.shape[0], **grammar_kwargs)
    if config.num_beams > 1 and not config.do_sample:
        if constraints:
            raise ValueError("json_schema / regex / choices are not supported with beam search (num_beams > 1)")
        if stepwise:
            return None
        return _beam_search(model, input_ids, attention_mask, features, config, streamer, tokenizer)
    expand = config.num_return_sequences
    if expand > 1:
        input_ids, attention_mask, features = _expand_rows(model, input_ids, attention_mask, features, expand)
        if constraints:
            constraints = [c for c in constraints for _ in range(expand)]
    matchers = None
    if constraints:
        if tokenizer is None:
            raise ValueError("json_schema / regex / choices need the tokenizer: pass tokenizer=processor.tokenizer")
        grammar = GrammarEngine.for_tokenizer(tokenizer, model.config.vocab_size, tuple(config.eos_ids))
        matchers = [grammar.matcher(c) if c is not None else None for c in constraints]
    steps = _sample_steps(model, input_ids, attention_mask, features, config, streamer, tokenizer, generator,
                          matchers)
    return _each_step_in_inference_mode(steps) if stepwise else _last_value(steps)


def _last_value(steps: Generator) -> Any:
    """Run a step generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def _each_step_in_inference_mode(steps: Generator) -> Generator:
    """The same steps, each run under inference mode (which stays off in the caller's code between them)."""
    while True:
        with torch.inference_mode():
            try:
                tokens = next(steps)
            except StopIteration as stop:
                return stop.value
        yield tokens


def _expand_rows(model, input_ids, attention_mask, features, times: int):
    """Repeat each row `times` times (adjacent), with its image features."""
    if features is not None:
        n_latents = model.config.image_seq_len
        images_per_row = ((input_ids == model.config.image_token_id).sum(dim=1) // n_latents).tolist()
        per_row = list(torch.split(features.reshape(-1, n_latents, features.shape[-1]), images_per_row))
        features = torch.cat([f for f in per_row for _ in range(times)])
    return input_ids.repeat_interleave(times, 0), attention_mask.repeat_interleave(times, 0), features


def new_cache(model, batch: int, capacity: int, device) -> KVCache:
    """A cache for `batch` rows of `capacity` tokens; each layer's part on that layer's device when a device_map
    dict spreads the decoder, else on `device`."""
    layer_devices = getattr(model.model.text_model, "layer_devices", None)
    return model.model.text_model.new_cache(batch, capacity, model.dtype, layer_devices or device)


def prefill(model, input_ids, attention_mask, features, cache) -> torch.Tensor:
    """Run the prompt (images merged from `features`) into `cache`; float32 logits of the last position."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, image_hidden_states=features,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


def decode_step(model, tokens: torch.Tensor, attention_mask: torch.Tensor, cache,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row through the cache; float32 logits [B, V]."""
    out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True)
    return out.logits[:, -1].float()


def static_bad_words_mask(config: GenerationConfig, vocab: int, device) -> torch.Tensor | None:
    singles = [w[0] for w in (config.bad_words_ids or []) if len(w) == 1]
    if not singles:
        return None
    mask = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    mask[0, singles] = True
    return mask


def _sample_steps(model, input_ids, attention_mask, features, config, streamer, tokenizer, generator, matchers=None):
    """The sampling loop as a generator: yields each step's new tokens [B], returns what generate() returns."""
    batch, prompt_len = input_ids.shape
    budget = _budget(config, prompt_len)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if budget == 0:
        if streamer is not None:
            streamer.end()
        return GenerateOutput(input_ids, ()) if config.return_dict_in_generate else input_ids
    device = input_ids.device
    eos = torch.tensor(config.eos_ids, device=device, dtype=torch.long)
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    bad_static = static_bad_words_mask(config, model.config.vocab_size, device)

    ids = torch.empty(batch, prompt_len + budget, dtype=torch.long, device=device)
    ids[:, :prompt_len] = input_ids
    mask = torch.ones(batch, prompt_len + budget, dtype=attention_mask.dtype, device=device)
    mask[:, :prompt_len] = attention_mask
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    scores_out: list[torch.Tensor] = []

    cache = new_cache(model, batch, prompt_len + budget, device)
    logits = prefill(model, input_ids, attention_mask, features, cache)
    length = prompt_len
    for step in range(budget):
        allowed = allowed_mask(matchers, logits.shape[-1], device) if matchers else None
        scores = process_logits(logits, ids[:, :length], config, step, bad_static, allowed)
        if config.output_scores:
            scores_out.append(scores)
        tokens = choose_tokens(scores, config, generator)
        tokens = torch.where(unfinished, tokens, config.pad_token_id)
        if matchers:
            for row, matcher in enumerate(matchers):
                if matcher is not None and bool(unfinished[row]):
                    matcher.advance(int(tokens[row]))
                    if matcher.finished:  # the output is complete: stop the row here
                        unfinished[row] = False
        ids[:, length] = tokens
        length += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        yield tokens
        if eos.numel():
            unfinished &= ~torch.isin(tokens, eos)
        if stop is not None:
            unfinished &= ~stop(ids[:, prompt_len:length])
        if not bool(unfinished.any()) or step == budget - 1:
            break
        logits = decode_step(model, tokens, mask[:, :length], cache)
    if streamer is not None:
        streamer.end()
    sequences = ids[:, :length]
    if config.return_dict_in_generate:
        return GenerateOutput(sequences, tuple(scores_out) if config.output_scores else None)
    return sequences


def _beam_search(model, input_ids, attention_mask, features, config, streamer, tokenizer):
    """Standard beam search (length_penalty, no early stop heuristic beyond transformers' default)."""
    if streamer is not None:
        raise ValueError("streaming is not supported with beam search (num_beams > 1)")
    beams = config.num_beams
    batch, prompt_len = input_ids.shape
    budget = _budget(config, prompt_len)
    device = input_ids.device
    eos_ids = set(config.eos_ids)
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    bad_static = static_bad_words_mask(config, model.config.vocab_size, device)
    input_ids, attention_mask, features = _expand_rows(model, input_ids, attention_mask, features, beams)
    rows = batch * beams

    ids = input_ids.new_empty(rows, prompt_len + budget)
    ids[:, :prompt_len] = input_ids
    mask = attention_mask.new_ones(rows, prompt_len + budget)
    mask[:, :prompt_len] = attention_mask
    beam_scores = torch.zeros(batch, beams, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: expand only the first at step one
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [budget == 0] * batch

    def add_hypothesis(b: int, seq: torch.Tensor, score: float) -> None:
        normalised = score / (seq.shape[0] - prompt_len) ** config.length_penalty if seq.shape[0] > prompt_len \
            else score
        finished[b].append((normalised, seq.clone()))
        finished[b].sort(key=lambda h: -h[0])
        del finished[b][beams:]

    length = prompt_len
    if budget:
        cache = new_cache(model, rows, prompt_len + budget, device)
        logits = prefill(model, input_ids, attention_mask, features, cache)
    for step in range(budget):
        scores = process_logits(logits, ids[:, :length], config, step, bad_static)
        logprobs = torch.log_softmax(scores, dim=-1)
        vocab = logprobs.shape[-1]
        candidates = (logprobs.view(batch, beams, vocab) + beam_scores[:, :, None]).view(batch, -1)
        top_scores, top_idx = candidates.topk(2 * beams, dim=1)
        next_beam = torch.zeros(batch, beams, dtype=torch.long, device=device)
        next_token = torch.full((batch, beams), config.pad_token_id, dtype=torch.long, device=device)
        next_score = torch.full((batch, beams), -1e9, device=device)
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            for rank, (score, idx) in enumerate(zip(top_scores[b].tolist(), top_idx[b].tolist())):
                beam, token = divmod(idx, vocab)
                row = b * beams + beam
                is_stop = token in eos_ids
                if not is_stop and stop is not None:
                    trial = torch.cat([ids[row, prompt_len:length], torch.tensor([token], device=device)])
                    is_stop = bool(stop(trial[None])[0])
                if is_stop:
                    if rank < beams and step + 1 >= config.min_new_tokens:
                        add_hypothesis(b, torch.cat([ids[row, :length], ids.new_tensor([token])]), score)
                    continue
                next_beam[b, kept], next_token[b, kept], next_score[b, kept] = beam, token, score
                kept += 1
                if kept == beams:
                    break
            best_running = next_score[b].max().item()
            if len(finished[b]) == beams:
                worst = finished[b][-1][0]
                denominator = (length + 1 - prompt_len) ** config.length_penalty
                if best_running / denominator <= worst:
                    done[b] = True
        source = (torch.arange(batch, device=device)[:, None] * beams + next_beam).flatten()
        ids[:, :length] = ids[source, :length]
        ids[:, length] = next_token.flatten()
        beam_scores = next_score
        length += 1
        if all(done) or step == budget - 1:
            break
        cache.reorder(source)
        logits = decode_step(model, next_token.flatten(), mask[:, :length], cache)
    for b in range(batch):
        if not done[b]:
            for k in range(beams):
                add_hypothesis(b, ids[b * beams + k, :length], beam_scores[b, k].item())
    best = [h for b in range(batch) for h in finished[b][: config.num_return_sequences]]
    width = max(seq.shape[0] for _, seq in best)
    sequences = input_ids.new_full((len(best), width), config.pad_token_id)
    for i, (_, seq) in enumerate(best):
        sequences[i, : seq.shape[0]] = seq
    if config.return_dict_in_generate:
        return GenerateOutput(sequences, None, torch.tensor([s for s, _ in best]))
    return sequences

