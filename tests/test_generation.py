"""Generation parity with transformers' generate, and the behaviour of sampling, beams and stopping."""

import pytest
import torch
from reference import left_pad, make_prompt, pad_images, reference_model, tiny_config_dict

from idefics2 import Idefics2ForConditionalGeneration
from idefics2.generation import GenerationConfig, min_p_filter, process_logits, top_k_filter, top_p_filter

CONFIGS = {
    "gqa": tiny_config_dict(),
    "window8": tiny_config_dict(text_kv_heads=1, perceiver_depth=3, n_latents=3, sliding_window=8),
}
GEN = dict(bad_words_ids=[[117], [118]], eos_token_id=[2, 7], pad_token_id=0)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    config = CONFIGS[request.param]
    ref = reference_model(config, seed=11)
    with torch.no_grad():  # sharpen the random logits so that greedy paths are decisive, not ties
        ref.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return config, ref, Idefics2ForConditionalGeneration.from_pretrained(path)


def batch_inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [[(56, 42)], [(28, 56), (56, 56)], []]
    rows = [make_prompt(g, config, len(s), 3 + 4 * i) for i, s in enumerate(sizes)]
    ids, mask = left_pad(rows)
    pixels, pixel_mask = pad_images(g, sizes)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask), sizes


def test_greedy_batch_matches_transformers_and_single_rows(pair):
    config, ref, ours = pair
    inputs, sizes = batch_inputs(config)
    with torch.no_grad():
        expected = ref.generate(**inputs, do_sample=False, max_new_tokens=24, **GEN)
    got = ours.generate(**inputs, do_sample=False, max_new_tokens=24, **GEN)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    width = inputs["input_ids"].shape[1]
    for i, s in enumerate(sizes):
        keep = inputs["attention_mask"][i].bool()
        single = {"input_ids": inputs["input_ids"][i:i + 1, keep]}
        if s:
            single.update(pixel_values=inputs["pixel_values"][i:i + 1, : len(s)],
                          pixel_attention_mask=inputs["pixel_attention_mask"][i:i + 1, : len(s)])
        alone = ours.generate(**single, max_new_tokens=24, **GEN)[0, keep.sum():]
        batched = got[i, width:][: alone.shape[0]]
        assert torch.equal(alone, batched), f"row {i}"


def test_bare_call_generates_twenty_tokens_like_transformers(pair):
    config, ref, ours = pair
    ids = make_prompt(torch.Generator().manual_seed(3), config, 0, 5)[None]
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, eos_token_id=None, pad_token_id=0)
    got = ours.generate(input_ids=ids, eos_token_id=None)
    assert torch.equal(got, expected) and got.shape[1] == ids.shape[1] + 20


def test_sampling_is_reproducible_with_a_seed(pair):
    config, ref, ours = pair
    inputs, _ = batch_inputs(config, seed=1)
    a = ours.generate(**inputs, do_sample=True, max_new_tokens=10, seed=5, top_k=20, top_p=0.9, temperature=0.8)
    b = ours.generate(**inputs, do_sample=True, max_new_tokens=10, seed=5, top_k=20, top_p=0.9, temperature=0.8)
    c = ours.generate(**inputs, do_sample=True, max_new_tokens=10, seed=6, top_k=20, top_p=0.9, temperature=0.8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_min_new_tokens_bad_words_and_eos_are_respected(pair):
    config, ref, ours = pair
    ids = make_prompt(torch.Generator().manual_seed(4), config, 0, 6)[None]
    first = ours.generate(input_ids=ids, max_new_tokens=1, eos_token_id=None)[0, -1].item()
    # Make the first greedy token an eos: without min_new_tokens we stop at once, with it we do not.
    stopped = ours.generate(input_ids=ids, max_new_tokens=8, eos_token_id=[first])
    assert stopped.shape[1] == ids.shape[1] + 1
    longer = ours.generate(input_ids=ids, max_new_tokens=8, eos_token_id=[first], min_new_tokens=4)
    assert longer.shape[1] >= ids.shape[1] + 5 and first not in longer[0, ids.shape[1]:ids.shape[1] + 4].tolist()
    banned = ours.generate(input_ids=ids, max_new_tokens=8, eos_token_id=None, bad_words_ids=[[first]])
    assert first not in banned[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("sample", [False, True])
def test_beam_search_and_multiple_sequences(pair, sample):
    config, ref, ours = pair
    ids = make_prompt(torch.Generator().manual_seed(5), config, 0, 6)[None]
    kwargs = dict(input_ids=ids, max_new_tokens=8, num_return_sequences=2, eos_token_id=[2], bad_words_ids=[[5]])
    if sample:
        kwargs.update(do_sample=True, seed=1)
    else:
        kwargs.update(num_beams=3)
    a, b = ours.generate(**kwargs), ours.generate(**kwargs)
    assert torch.equal(a, b)
    assert a.shape[0] == 2 and torch.equal(a[:, : ids.shape[1]], ids.expand(2, -1))
    assert 5 not in a[:, ids.shape[1]:].tolist()


def test_beam_search_matches_transformers_on_one_row(pair):
    config, ref, ours = pair
    ids = make_prompt(torch.Generator().manual_seed(6), config, 0, 6)[None]
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, num_beams=3, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    got = ours.generate(input_ids=ids, num_beams=3, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(got, expected)


def test_logits_filters_match_transformers_processors():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 300, generator=g) * 3
    ids = torch.randint(0, 300, (4, 17), generator=g)
    assert torch.equal(top_k_filter(scores, 7), TopKLogitsWarper(7)(ids, scores))
    assert torch.equal(top_p_filter(scores, 0.8), TopPLogitsWarper(0.8)(ids, scores))
    assert torch.equal(min_p_filter(scores, 0.1), MinPLogitsWarper(0.1)(ids, scores))
    config = GenerationConfig(do_sample=True, repetition_penalty=1.3, temperature=0.7, top_k=0)
    expected = TemperatureLogitsWarper(0.7)(ids, RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()))
    assert torch.allclose(process_logits(scores, ids, config, 0, None), expected, atol=0, rtol=0)


def test_invalid_generation_arguments():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GenerationConfig().updated(temperature=0.0)
    with pytest.raises(TypeError, match="unknown arguments"):
        GenerationConfig().updated(max_new_token=3)
    with pytest.raises(ValueError, match="num_return_sequences > 1 needs"):
        GenerationConfig().updated(num_return_sequences=2)


def _tokenizer():
    import os

    from idefics2 import Idefics2Tokenizer

    return Idefics2Tokenizer.from_pretrained(os.path.join(os.path.dirname(__file__), "fixtures", "idefics2-8b"))


def _first_hit(text_of, row, stop):
    """The number of new tokens after which the row's text first contains `stop` (None if it never does)."""
    for n in range(1, len(row) + 1):
        if stop in text_of(row[:n]):
            return n
    return None


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_stop_strings_end_each_row_where_its_text_first_contains_them(pair, mode):
    """A stop string taken from an unstopped run's text: the stopped run is that run cut right after the token
    that completes the string, rows of a batch stop on their own, finished rows get pad. The tiny models' ids
    (< 120) are the Mistral vocabulary's byte tokens (ASCII text). transformers is no reference here: its
    StopStringCriteria matches the vocabulary's token strings, and byte tokens read "<0x42>" there, so it runs on
    past such strings (tested by hand: "B+" from tokens <0x42><0x2B> does not stop it)."""
    config, _, ours = pair
    tokenizer = _tokenizer()
    inputs, _ = batch_inputs(config, seed=8)
    prompt_len = inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=14, eos_token_id=None, pad_token_id=0, **inputs)
    if mode == "sample":
        kwargs.update(do_sample=True, seed=3, top_k=0)
    elif mode == "beam":
        # length_penalty 0 ranks by summed log-probabilities: a hypothesis stopped early keeps its lead
        kwargs.update(num_beams=3, num_return_sequences=3, length_penalty=0.0,
                      **{name: value[:1] for name, value in inputs.items()})
    free = ours.generate(**kwargs)[:, prompt_len:].tolist()
    text_of = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    stop = text_of(free[0][4:6])  # completed by new token 6 of row 0 at the latest
    stopped = ours.generate(**kwargs, stop_strings=stop, tokenizer=tokenizer)[:, prompt_len:].tolist()
    if mode == "beam":  # hypotheses that end compete with the running ones: each that has the string ends there
        hits = [_first_hit(text_of, cut, stop) for cut in stopped]
        assert any(n is not None for n in hits), (stopped, stop)
        assert all(n is None or all(t == 0 for t in cut[n:]) for n, cut in zip(hits, stopped))
        assert stopped == ours.generate(**kwargs, stop_strings=stop, tokenizer=tokenizer)[:, prompt_len:].tolist()
        return
    for row, cut in zip(free, stopped):
        n = _first_hit(text_of, row, stop)
        if n is None:
            assert cut == row
        else:
            assert cut[:n] == row[:n] and all(t == 0 for t in cut[n:]), (row, cut, stop)
    assert _first_hit(text_of, stopped[0], stop) is not None
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(**kwargs, stop_strings=stop)
