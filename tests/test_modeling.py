"""End-to-end parity with transformers 5.24 on random checkpoints saved by transformers and loaded by us."""

import pytest
import torch
from reference import left_pad, make_prompt, pad_images, reference_model, tiny_config_dict

from idefics2 import Idefics2ForConditionalGeneration, Idefics2Model

TOL = 1e-5

CONFIGS = {
    "gqa": tiny_config_dict(),
    # MQA text, deeper perceiver with MQA, a sliding window much shorter than the sequences.
    "window8-mqa": tiny_config_dict(text_heads=4, text_kv_heads=1, perceiver_heads=2, perceiver_kv_heads=1,
                                    perceiver_depth=3, n_latents=3, sliding_window=8),
    # Plain multi-head everywhere, one perceiver layer, patch 7 (more patches per image), window 16.
    "mha-patch7": tiny_config_dict(vision_heads=2, text_heads=2, text_kv_heads=2, perceiver_heads=4,
                                   perceiver_kv_heads=4, perceiver_depth=1, n_latents=5, sliding_window=16,
                                   patch_size=7),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(config dict, transformers model, our model loaded from the checkpoint transformers wrote)."""
    config = CONFIGS[request.param]
    ref = reference_model(config, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    ours = Idefics2ForConditionalGeneration.from_pretrained(path)
    return config, ref, ours


def run_both(ref, ours, **inputs):
    with torch.no_grad():
        return ref(**inputs), ours(**inputs)


def labels_for(ids: torch.Tensor, mask: torch.Tensor | None, config: dict) -> torch.Tensor:
    labels = ids.clone()
    labels[ids == config["image_token_id"]] = -100
    if mask is not None:
        labels[mask == 0] = -100
    return labels


def test_text_only(pair):
    config, ref, ours = pair
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([make_prompt(g, config, 0, 23) for _ in range(2)])
    a, b = run_both(ref, ours, input_ids=ids, labels=labels_for(ids, None, config))
    assert (a.logits - b.logits).abs().max() <= TOL
    assert torch.allclose(a.loss, b.loss, atol=1e-6, rtol=0)


def test_one_image(pair):
    config, ref, ours = pair
    g = torch.Generator().manual_seed(1)
    ids = make_prompt(g, config, 1, 9)[None]
    pixels = torch.rand(1, 1, 3, 56, 56, generator=g) * 2 - 1
    a, b = run_both(ref, ours, input_ids=ids, pixel_values=pixels, labels=labels_for(ids, None, config))
    assert (a.logits - b.logits).abs().max() <= TOL
    assert torch.allclose(a.loss, b.loss, atol=1e-6, rtol=0)


def test_batch_with_one_three_and_zero_images_non_square_and_left_padded(pair):
    config, ref, ours = pair
    g = torch.Generator().manual_seed(2)
    sizes = [[(56, 42)], [(30, 56), (56, 56), (42, 28)], []]
    rows = [make_prompt(g, config, len(s), 5 + 3 * i) for i, s in enumerate(sizes)]
    ids, mask = left_pad(rows)
    pixels, pixel_mask = pad_images(g, sizes)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask,
                  labels=labels_for(ids, mask, config))
    a, b = run_both(ref, ours, **inputs)
    real = mask.bool()
    assert (a.logits[real] - b.logits[real]).abs().max() <= TOL
    assert torch.allclose(a.loss, b.loss, atol=1e-6, rtol=0)
    # The features of the 4 real images came through, in order (the padding slots were skipped).
    assert b.image_hidden_states.shape[0] == 4


def test_left_padded_rows_equal_unpadded_single_rows(pair):
    config, ref, ours = pair
    g = torch.Generator().manual_seed(3)
    sizes = [[(56, 56)], [], [(28, 42), (42, 56)]]
    rows = [make_prompt(g, config, len(s), 4 + 5 * i) for i, s in enumerate(sizes)]
    ids, mask = left_pad(rows)
    pixels, pixel_mask = pad_images(g, sizes)
    with torch.no_grad():
        batch = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask)
        for i, (row, s) in enumerate(zip(rows, sizes)):
            single = {"input_ids": row[None]}
            if s:
                single.update(pixel_values=pixels[i:i + 1, : len(s)], pixel_attention_mask=pixel_mask[i:i + 1, : len(s)])
            alone = ours(**single).logits[0]
            padded = batch.logits[i, ids.shape[1] - len(row):]
            assert (alone - padded).abs().max() <= TOL, f"row {i}"


def test_eager_and_sdpa_agree_and_match_reference_eager(pair, tmp_path):
    config, ref, ours = pair
    g = torch.Generator().manual_seed(4)
    sizes = [[(42, 56)], [(56, 28), (28, 28)]]
    rows = [make_prompt(g, config, len(s), 6 + 7 * i) for i, s in enumerate(sizes)]
    ids, mask = left_pad(rows)
    pixels, pixel_mask = pad_images(g, sizes)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask)
    with torch.no_grad():
        sdpa = ours(**inputs).logits
        ours.set_attn_implementation("eager")
        try:
            eager = ours(**inputs).logits
        finally:
            ours.set_attn_implementation("sdpa")
        ref.set_attn_implementation("eager")
        try:
            ref_eager = ref(**inputs).logits
        finally:
            ref.set_attn_implementation("sdpa")
    real = mask.bool()
    assert (sdpa[real] - eager[real]).abs().max() <= TOL
    assert (ref_eager[real] - eager[real]).abs().max() <= TOL


def test_attentions_and_hidden_states_match_reference(pair):
    config, ref, ours = pair
    g = torch.Generator().manual_seed(5)
    ids = make_prompt(g, config, 1, 12)[None]
    pixels = torch.rand(1, 1, 3, 42, 56, generator=g) * 2 - 1
    ref.set_attn_implementation("eager")
    try:
        a, b = run_both(ref, ours, input_ids=ids, pixel_values=pixels, output_attentions=True,
                        output_hidden_states=True)
    finally:
        ref.set_attn_implementation("sdpa")
    assert len(a.attentions) == len(b.attentions)
    for x, y in zip(a.attentions, b.attentions):
        assert (x - y).abs().max() <= TOL
    assert len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y).abs().max() <= TOL


def test_logits_to_keep(pair):
    config, ref, ours = pair
    ids = make_prompt(torch.Generator().manual_seed(6), config, 0, 10)[None]
    for keep in (1, 3, torch.tensor([0, 4, 7])):
        a, b = run_both(ref, ours, input_ids=ids, logits_to_keep=keep)
        assert a.logits.shape == b.logits.shape
        assert (a.logits - b.logits).abs().max() <= TOL


def test_cached_decoding_equals_full_forward(pair):
    """Prefill then one token at a time through the KV cache == one full forward (window included)."""
    config, ref, ours = pair
    g = torch.Generator().manual_seed(7)
    sizes = [[(56, 56)], []]
    rows = [make_prompt(g, config, len(s), 20 + 4 * i) for i, s in enumerate(sizes)]
    ids, mask = left_pad(rows)
    pixels, pixel_mask = pad_images(g, sizes)
    prefill = ids.shape[1] - 9
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits
        out = ours(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], pixel_values=pixels,
                   pixel_attention_mask=pixel_mask, use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(prefill, ids.shape[1]):
            out = ours(input_ids=ids[:, t:t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            cache = out.past_key_values
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (full[real] - stepped[real]).abs().max() <= TOL


def test_image_hidden_states_and_inputs_embeds_paths(pair):
    config, ref, ours = pair
    g = torch.Generator().manual_seed(8)
    sizes = [[(56, 42), (28, 56)]]
    ids = make_prompt(g, config, 2, 6)[None]
    pixels, pixel_mask = pad_images(g, sizes)
    with torch.no_grad():
        base = ours(input_ids=ids, pixel_values=pixels, pixel_attention_mask=pixel_mask)
        features, counts = ours.get_image_features(pixels, pixel_mask)
        assert counts.tolist() == [2]
        via_features = ours(input_ids=ids, image_hidden_states=features)
        embeds = ours.get_input_embeddings()(ids)
        via_embeds = ours(inputs_embeds=embeds, pixel_values=pixels, pixel_attention_mask=pixel_mask)
        as_tuple = ours(input_ids=ids, pixel_values=pixels, pixel_attention_mask=pixel_mask, return_dict=False)
    assert torch.equal(base.logits, via_features.logits)
    assert (base.logits - via_embeds.logits).abs().max() <= TOL
    assert torch.equal(as_tuple[0], base.logits)
    assert torch.equal(base["logits"], base.logits)


def test_base_model_matches_reference_hidden_state(pair, tmp_path):
    config, ref, ours = pair
    ref.model.save_pretrained(tmp_path)  # Idefics2Model keys, no `model.` prefix
    base = Idefics2Model.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(9)
    ids = make_prompt(g, config, 1, 5)[None]
    pixels = torch.rand(1, 1, 3, 56, 56, generator=g)
    with torch.no_grad():
        a = ref.model(input_ids=ids, pixel_values=pixels).last_hidden_state
        b = base(input_ids=ids, pixel_values=pixels).last_hidden_state
    assert (a - b).abs().max() <= TOL


def test_images_of_different_sizes_are_encoded_without_their_padding(pair):
    """Images padded to a common size run in groups of equal extent, cropped to it: the features and their
    gradients equal the padded batch's (where the padding is masked out) within float noise; a patch mask that is
    not a top-left rectangle keeps the padded batch."""
    config, _, ours = pair
    model = ours.model
    g = torch.Generator().manual_seed(7)
    pixels, pixel_mask = pad_images(g, [[(56, 42), (30, 56), (56, 42), (56, 56)]])
    pixels, pixel_mask = pixels[0], pixel_mask[0]
    p = config["vision_config"]["patch_size"]
    h, w = pixel_mask.shape[1] // p, pixel_mask.shape[2] // p
    patch_mask = pixel_mask[:, : h * p, : w * p].reshape(-1, h, p, w, p).bool().all(dim=4).all(dim=2)
    calls = []
    hook = model.vision_model.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    try:
        grouped_pixels = pixels.clone().requires_grad_()
        grouped = model.encode_patches(grouped_pixels, patch_mask)
        assert len(calls) == 3 and sorted(c[0] for c in calls) == [1, 1, 2]  # extents 56x42 (twice), 30x56, 56x56
        calls.clear()
        padded_pixels = pixels.clone().requires_grad_()
        padded = model.connector(model.vision_model(padded_pixels, patch_mask), patch_mask.reshape(4, -1))
        assert (grouped - padded).abs().max() <= TOL
        weights = torch.randn(grouped.shape, generator=g)
        (grouped * weights).sum().backward()
        (padded * weights).sum().backward()
        assert (grouped_pixels.grad - padded_pixels.grad).abs().max() <= TOL * max(1.0, padded_pixels.grad.abs().max())
        calls.clear()
        holes = patch_mask.clone()
        holes[0, 0, 0] = False  # not a top-left rectangle
        with torch.no_grad():
            model.encode_patches(pixels, holes)
        assert calls == [tuple(pixels.shape)]
    finally:
        hook.remove()


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    config = CONFIGS["gqa"]
    path = tmp_path_factory.mktemp("small")
    reference_model(config).save_pretrained(path)
    return config, Idefics2ForConditionalGeneration.from_pretrained(path)


def test_wrong_pixel_values_rank(small):
    config, model = small
    ids = make_prompt(torch.Generator().manual_seed(0), config, 1, 3)[None]
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, num_images, channels"):
        model(input_ids=ids, pixel_values=torch.rand(3, 56, 56))
    with pytest.raises(ValueError, match="channels=3"):
        model(input_ids=ids, pixel_values=torch.rand(1, 1, 1, 56, 56))


def test_image_token_count_mismatch(small):
    config, model = small
    g = torch.Generator().manual_seed(0)
    ids = make_prompt(g, config, 2, 3)[None]
    with pytest.raises(ValueError, match=r"sample 0: input_ids has 8 image tokens .* 1 image\(s\) x 4 latents"):
        model(input_ids=ids, pixel_values=torch.rand(1, 1, 3, 56, 56))
    with pytest.raises(ValueError, match="pixel_values has 2 samples but the text batch has 1"):
        model(input_ids=ids, pixel_values=torch.rand(2, 1, 3, 56, 56))


def test_pixel_mask_shape_and_ids_range_are_checked(small):
    config, model = small
    ids = make_prompt(torch.Generator().manual_seed(0), config, 1, 3)[None]
    with pytest.raises(ValueError, match="pixel_attention_mask must have shape"):
        model(input_ids=ids, pixel_values=torch.rand(1, 1, 3, 56, 56), pixel_attention_mask=torch.ones(1, 56, 56))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.tensor([[1, 5000]]))


def test_unknown_attn_implementation(small, tmp_path):
    config, model = small
    with pytest.raises(ValueError, match="attn_implementation='flashy' is unknown"):
        model.set_attn_implementation("flashy")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attn_implementation='flashy' is unknown"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flashy")


def test_inputs_on_another_device_are_a_clear_error(small):
    config, model = small
    ids = torch.tensor([[1, 5, 7]], device="meta")  # stands in for CUDA inputs given to a CPU model
    with pytest.raises(ValueError, match=r"input_ids are on meta but the model is on cpu: move the inputs"):
        model(input_ids=ids)


def test_flash_attention_without_flash_attn_is_a_clear_error(small):
    pytest.importorskip("torch")
    config, model = small
    if torch.cuda.is_available():
        pytest.skip("CUDA present: flash-attn availability depends on the install")
    with pytest.raises(ValueError, match="flash_attention_2' is not available"):
        model.set_attn_implementation("flash_attention_2")
