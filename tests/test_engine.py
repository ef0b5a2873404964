"""Continuous batching: requests decoded together give exactly what each gives alone."""

import threading

import pytest
import torch
from reference import make_prompt, reference_model, tiny_config_dict

from idefics2 import Idefics2ForConditionalGeneration
from idefics2.engine import Engine, EngineRequest, FeatureCache, ImageInput
from idefics2.generation import GenerationConfig

CONFIG = tiny_config_dict(sliding_window=16)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ref = reference_model(CONFIG, seed=21)
    with torch.no_grad():
        ref.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("engine")
    ref.save_pretrained(path)
    return Idefics2ForConditionalGeneration.from_pretrained(path)


def requests_for(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        n_images = i % 3
        ids = make_prompt(g, CONFIG, n_images, 2 + 3 * i)
        images = []
        for j in range(n_images):
            h, w = (56, 42) if j % 2 else (28, 56)
            images.append(ImageInput(key=f"img-{i}-{j}", pixel_values=torch.rand(1, 1, 3, h, w, generator=g) * 2 - 1))
        config = GenerationConfig(max_new_tokens=6 + 2 * i, eos_token_id=[2], pad_token_id=0, bad_words_ids=[[5]])
        out.append((ids, images, config))
    return out


def alone(model, ids, images, config):
    kwargs = {}
    if images:
        kwargs["image_hidden_states"] = torch.cat(
            [model.model.get_image_features(im.pixel_values)[0] for im in images])
    out = model.generate(input_ids=ids[None], generation_config=config, **kwargs)
    return out[0, ids.shape[0]:].tolist()


def test_concurrent_greedy_requests_equal_their_solo_runs(model):
    specs = requests_for(model, 7)
    expected = [alone(model, *spec) for spec in specs]
    engine = Engine(model, max_batch=4, max_tokens_per_request=256).start()
    try:
        requests = [EngineRequest(input_ids=ids, images=images, config=config) for ids, images, config in specs]
        threads = [threading.Thread(target=engine.generate, args=(r, 60)) for r in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.shutdown()
    for i, (request, want) in enumerate(zip(requests, expected)):
        assert request.finish_reason in ("stop", "length"), request.error
        assert request.tokens == want, f"request {i}"
    assert engine.batch_size == 0 and engine.cache.active == 0
    assert engine.metrics.largest_batch >= 3  # the requests really ran together


def test_feature_cache_hits_and_cancellation(model):
    (ids, images, config), = [s for s in requests_for(model, 3) if s[1]][:1]
    engine = Engine(model, max_batch=2, max_tokens_per_request=256).start()
    try:
        first = engine.generate(EngineRequest(input_ids=ids, images=images, config=config), 60)
        again = engine.generate(EngineRequest(input_ids=ids, images=[ImageInput(key=im.key) for im in images],
                                              config=config), 60)
        assert again.tokens == first.tokens
        assert engine.features.hits >= len(images)
        long = EngineRequest(input_ids=ids, images=images, config=GenerationConfig(max_new_tokens=200))
        long.on_token = lambda token: long.cancel() if len(long.tokens) >= 3 else None
        engine.generate(long, 60)
        assert long.finish_reason == "cancelled" and len(long.tokens) <= 4
    finally:
        engine.shutdown()
    assert engine.cache.active == 0


def test_feature_cache_is_bounded_in_bytes():
    cache = FeatureCache(max_bytes=1000)
    cache.put("big", torch.zeros(1000))  # 4000 bytes: never stored
    assert cache.get("big") is None
    for i in range(5):
        cache.put(str(i), torch.zeros(100))  # 400 bytes each: only the last two fit
    assert cache.get("0") is None and cache.get("4") is not None and cache.bytes <= 1000


def test_request_over_the_token_limit_is_refused(model):
    engine = Engine(model, max_batch=1, max_tokens_per_request=32)
    with pytest.raises(ValueError, match="exceeds the per-request limit of 32 tokens"):
        engine.submit(EngineRequest(input_ids=torch.ones(30, dtype=torch.long),
                                    config=GenerationConfig(max_new_tokens=8)))
