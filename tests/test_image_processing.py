"""Idefics2ImageProcessor: bit parity with transformers 5.24 `Idefics2ImageProcessorPil`, config I/O, errors,
and a property test over random sizes, modes and counts."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from idefics2.batch_feature import BatchFeature
from idefics2.image_processing import Idefics2ImageProcessor, resize_output_size
from idefics2.media import ImageLoadError

FIXTURE_8B = os.path.join(os.path.dirname(__file__), "fixtures", "idefics2-8b")
ALL_MODES = ["RGB", "L", "LA", "RGBA", "P", "P_transparency", "CMYK", "I;16", "1", "I", "F"]


@pytest.fixture(scope="module")
def reference():
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    return Idefics2ImageProcessorPil.from_pretrained(FIXTURE_8B)


@pytest.fixture(scope="module")
def ours():
    return Idefics2ImageProcessor.from_pretrained(FIXTURE_8B)


def assert_same(ref_out, our_out):
    assert set(ref_out.keys()) == set(our_out.keys())
    ref_pv, our_pv = np.asarray(ref_out["pixel_values"]), np.asarray(our_out["pixel_values"])
    assert ref_pv.shape == our_pv.shape
    assert our_pv.dtype == np.float32
    assert np.abs(ref_pv - our_pv).max() <= 1e-6
    if "pixel_attention_mask" in ref_out:
        ref_mask, our_mask = np.asarray(ref_out["pixel_attention_mask"]), np.asarray(our_out["pixel_attention_mask"])
        assert our_mask.dtype == np.int64
        np.testing.assert_array_equal(ref_mask, our_mask)


def run_both(reference, ours, images, **kwargs):
    """Same output as the reference, or the same exception type where the reference refuses the input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ref_out = reference(images, **kwargs)
        except ValueError:
            with pytest.raises(ValueError, match="sample 0, image 0"):
                ours(images, **kwargs)
            return None
    our_out = ours(images, **kwargs)
    assert_same(ref_out, our_out)
    return our_out


# ------------------------------------------------------------------------------------------------- resize rule
@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (640, 480, (480, 640)), (1920, 1080, (551, 980)), (300, 2000, (980, 378)), (100, 50, (378, 378)),
        (1000, 1000, (980, 980)), (980, 979, (979, 980)), (2000, 1999, (979, 980)), (1600, 1067, (653, 980)),
        (981, 500, (499, 980)), (13, 13, (378, 378)), (1, 4000, (980, 378)),
    ],
)
def test_resize_rule_matches_spec_examples(width, height, expected):
    assert resize_output_size(height, width, {"shortest_edge": 378, "longest_edge": 980}) == expected


def test_resize_rule_fixed_size_and_bad_size():
    assert resize_output_size(10, 20, {"height": 30, "width": 40}) == (30, 40)
    with pytest.raises(ValueError, match="shortest_edge"):
        resize_output_size(10, 20, {"shortest_edge": 378})


# --------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("splitting", [False, True])
def test_parity_modes_and_mixed_batches(reference, ours, make_test_image, splitting):
    images = [make_test_image(40 + 17 * i, 30 + 23 * i, mode, seed=i) for i, mode in enumerate(ALL_MODES)]
    batch = [images[:3], [], images[3:4], images[4:]]  # different counts per sample, including zero
    out = run_both(reference, ours, batch, do_image_splitting=splitting)
    per = 5 if splitting else 1
    assert out["pixel_values"].shape[:3] == (4, per * len(images[4:]), 3)
    assert out["pixel_attention_mask"][1].sum() == 0  # the empty sample is all padding


@pytest.mark.parametrize(
    "size", [(1, 1), (2, 2), (3, 1000), (1000, 3), (378, 378), (640, 480), (981, 500), (1920, 1080), (300, 2000)]
)
def test_parity_sizes_with_and_without_splitting(reference, ours, make_test_image, size):
    image = make_test_image(*size, "RGB", seed=sum(size))
    run_both(reference, ours, image, do_image_splitting=False)
    if min(size) >= 2:
        run_both(reference, ours, [[image], [image, image]], do_image_splitting=True)


def test_parity_very_large_image(reference, ours, make_test_image):
    image = make_test_image(4000, 3000, "RGB", seed=7)
    run_both(reference, ours, [image], do_image_splitting=True)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("kind", ["uint8", "float01", "float255", "tensor"])
def test_parity_array_inputs(reference, ours, layout, channels, kind):
    rng = np.random.default_rng(channels)
    hwc = rng.integers(0, 256, (45, 70, channels), dtype=np.uint8)
    if kind == "float01":
        array = hwc.astype(np.float32) / 255
    elif kind == "float255":
        array = hwc.astype(np.float64)
    else:
        array = hwc
    if layout == "chw":
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    image = torch.from_numpy(array) if kind == "tensor" else array
    run_both(reference, ours, image)
    run_both(reference, ours, [image, image], do_image_splitting=True)
    if kind == "float01":  # the documented way to pass [0, 1] floats
        run_both(reference, ours, image, do_rescale=False)


@pytest.mark.parametrize(
    "overrides",
    [
        {"do_resize": False},
        {"do_normalize": False},
        {"do_rescale": False},
        {"image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]},
        {"size": {"height": 100, "width": 140}},
        {"size": {"shortest_edge": 100, "longest_edge": 300}},
        {"rescale_factor": 1 / 127.5},
    ],
)
def test_parity_per_call_overrides(reference, ours, make_test_image, overrides):
    images = [[make_test_image(200, 120, "RGB", 1)], [make_test_image(90, 333, "RGBA", 2)]]
    run_both(reference, ours, images, **overrides)
    run_both(reference, ours, images, do_image_splitting=True, **overrides)


def test_parity_without_padding(reference, ours, make_test_image):
    images = [make_test_image(200, 120, "RGB", 1), make_test_image(90, 333, "L", 2)]
    ref_out = reference(images, do_pad=False)
    our_out = ours(images, do_pad=False)
    assert set(our_out.keys()) == {"pixel_values"}
    for ref_sample, our_sample in zip(ref_out["pixel_values"], our_out["pixel_values"]):
        for ref_image, our_image in zip(ref_sample, our_sample):
            np.testing.assert_array_equal(ref_image, our_image)
    same_size = [make_test_image(200, 120, "RGB", i) for i in range(2)]
    stacked = ours(same_size, do_pad=False, do_image_splitting=False, return_tensors="pt")["pixel_values"]
    assert stacked.shape == (1, 2, 3, 378, 378)
    with pytest.raises(ValueError, match="do_pad=False"):
        ours([same_size[0], make_test_image(1000, 400)], do_pad=False, return_tensors="pt")


def test_return_tensor_types(ours, make_test_image):
    image = make_test_image(50, 60)
    assert isinstance(ours(image)["pixel_values"], np.ndarray)
    assert isinstance(ours(image, return_tensors="np")["pixel_attention_mask"], np.ndarray)
    out = ours(image, return_tensors="pt")
    assert isinstance(out, BatchFeature)
    assert out.pixel_values.dtype == torch.float32 and out.pixel_attention_mask.dtype == torch.int64
    assert out.pixel_values.shape == (1, 5, 3, 378, 378)  # the 8b config splits images
    with pytest.raises(ValueError, match="return_tensors"):
        ours(image, return_tensors="tf")


def test_does_not_modify_inputs(ours, make_test_image):
    image = make_test_image(50, 60, "RGBA")
    before = np.asarray(image).copy()
    ours([image, image], do_image_splitting=True)
    np.testing.assert_array_equal(np.asarray(image), before)
    assert image.mode == "RGBA"


# ----------------------------------------------------------------------------------------------- config I/O
def test_config_roundtrip_and_reference_loads_ours(ours, tmp_path, fixture_8b_dir, make_test_image):
    assert ours.do_image_splitting is True and ours.size == {"shortest_edge": 378, "longest_edge": 980}
    ours.save_pretrained(tmp_path)
    with open(os.path.join(fixture_8b_dir, "preprocessor_config.json")) as handle:
        assert json.load(handle) == json.loads((tmp_path / "preprocessor_config.json").read_text())
    again = Idefics2ImageProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == ours.to_dict()
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    run_both(Idefics2ImageProcessorPil.from_pretrained(tmp_path), again, make_test_image(700, 500))


def test_loads_transformers5_layout(tmp_path, fixture_8b_dir):
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(fixture_8b_dir).save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    loaded = Idefics2ImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == Idefics2ImageProcessor.from_pretrained(fixture_8b_dir).to_dict()
    overridden = Idefics2ImageProcessor.from_pretrained(tmp_path, do_image_splitting=False)
    assert overridden.do_image_splitting is False


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Idefics2ImageProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (np.zeros((0, 10, 3), np.uint8), ValueError, "sample 0, image 0: the image is empty"),
        ([[np.zeros((5, 5, 3), np.uint8)], [np.zeros((4, 0, 3), np.uint8)]], ValueError, "sample 1, image 0"),
        (np.zeros((2, 3, 4, 5, 6), np.uint8), ValueError, "expected a 2-D"),
        (np.zeros((10, 10, 2), np.uint8), ValueError, "channel"),
        (np.zeros((10, 10, 3), bool), TypeError, "dtype"),
        (np.zeros((10, 10, 3), np.complex64), TypeError, "dtype"),
        (np.full((10, 10, 3), 300.5), ValueError, "pixel values"),
        (np.full((10, 10, 3), 1000, np.int32), ValueError, r"\[0, 255\]"),
        ([], ValueError, "empty list"),
        ([[]], ValueError, "no images"),
        ({"image": 1}, TypeError, "images must be"),
        ([[1, 2]], TypeError, "sample 0, image 0"),
        ([np.zeros((5, 5, 3), np.uint8), [np.zeros((5, 5, 3), np.uint8)]], TypeError, "mixes"),
    ],
)
def test_bad_inputs_raise_clear_errors(ours, images, error, match):
    with pytest.raises(error, match=match):
        ours(images)


def test_splitting_too_small_image(ours):
    with pytest.raises(ValueError, match="sample 0, image 1: a 1x5 image cannot be split"):
        ours([np.zeros((5, 5, 3), np.uint8), np.zeros((5, 1, 3), np.uint8)], do_image_splitting=True)


def test_pixel_limit(ours, make_test_image, tmp_path):
    image = make_test_image(100, 100)
    with pytest.raises(ImageLoadError, match="max_image_pixels"):
        ours([[image], [make_test_image(10, 10)]], max_image_pixels=5000)
    path = tmp_path / "big.png"
    image.save(path)
    limited = Idefics2ImageProcessor(max_image_pixels=9999)
    with pytest.raises(ImageLoadError, match="sample 0, image 0: .*10,000 pixels"):
        limited(str(path))
    assert Idefics2ImageProcessor(max_image_pixels=None)(str(path))["pixel_values"].shape == (1, 1, 3, 378, 378)


def test_paths_and_non_image_files(ours, make_test_image, tmp_path):
    path = tmp_path / "image.png"
    make_test_image(64, 48).save(path)
    np.testing.assert_array_equal(ours(str(path))["pixel_values"], ours(Image.open(path))["pixel_values"])
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ImageLoadError, match="not an image"):
        ours(str(text_file))
    with pytest.raises(ImageLoadError, match="neither an existing file"):
        ours(str(tmp_path / "missing.png"))
    with pytest.raises(ImageLoadError, match="remote images are disabled"):
        ours("https://example.com/cat.png")


def test_unknown_argument(ours, make_test_image):
    with pytest.raises(TypeError, match="do_image_spliting"):
        ours(make_test_image(10, 10), do_image_spliting=True)


# ----------------------------------------------------------------------------------------------- properties
DIMENSIONS = st.one_of(st.integers(1, 64), st.integers(300, 1100), st.sampled_from([1, 2, 3, 2500, 4000]))


@st.composite
def batches(draw):
    n_samples = draw(st.integers(1, 3))
    samples = []
    for _ in range(n_samples):
        count = draw(st.integers(0, 3))
        samples.append([(draw(DIMENSIONS), draw(DIMENSIONS), draw(st.sampled_from(ALL_MODES + ["array"])))
                        for _ in range(count)])
    return samples, draw(st.booleans()), draw(st.sampled_from([None, 2_000_000]))


def _solid(width, height, mode, value):
    if mode == "array":
        # An (H, W, 3) array with H in 1, 3, 4 reads as channels-first (the reference's guess, which we keep);
        # give those heights as (3, H, W) so the array means the image the test expects.
        if height in (1, 3, 4):
            return np.full((3, height, width), value, np.uint8)
        return np.full((height, width, 3), value, np.uint8)
    if mode == "P_transparency":
        image = Image.new("P", (width, height), value)
        image.info["transparency"] = value
        return image
    base_mode = {"I;16": "I;16", "F": "F", "I": "I"}.get(mode, mode)
    fill = value if mode in ("L", "P", "1", "I;16", "I", "F") else (value,) * len(Image.new(mode, (1, 1)).getbands())
    return Image.new(base_mode, (width, height), fill)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_property_shapes_masks_or_documented_errors(spec):
    samples, splitting, pixel_limit = spec
    processor = Idefics2ImageProcessor(do_image_splitting=splitting, max_image_pixels=pixel_limit)
    images = [[_solid(w, h, mode, 7 * (i + j)) for j, (w, h, mode) in enumerate(sample)]
              for i, sample in enumerate(samples)]
    dims = [[(w, h) for w, h, _ in sample] for sample in samples]
    all_dims = [d for sample in dims for d in sample]
    if not all_dims:
        with pytest.raises(ValueError, match="no images|empty"):
            processor(images)
        return
    if pixel_limit is not None and any(w * h > pixel_limit for w, h in all_dims):
        with pytest.raises(ImageLoadError, match="max_image_pixels"):
            processor(images)
        return
    if splitting and any(min(w, h) < 2 for w, h in all_dims):
        with pytest.raises(ValueError, match="cannot be split"):
            processor(images)
        return
    out = processor(images, return_tensors="pt")
    per = 5 if splitting else 1
    expected = []
    for sample in dims:
        sizes = []
        for w, h in sample:
            crops = [(h // 2, w // 2), (h // 2, w - w // 2), (h - h // 2, w // 2), (h - h // 2, w - w // 2), (h, w)]
            for ch, cw in (crops if splitting else [(h, w)]):
                sizes.append(resize_output_size(ch, cw, processor.size))
        expected.append(sizes)
    max_h = max(s[0] for sample in expected for s in sample)
    max_w = max(s[1] for sample in expected for s in sample)
    n = max(len(sample) for sample in dims) * per
    assert out["pixel_values"].shape == (len(samples), n, 3, max_h, max_w)
    assert out["pixel_attention_mask"].shape == (len(samples), n, max_h, max_w)
    mask = out["pixel_attention_mask"]
    values = out["pixel_values"]
    assert values.min() >= -1.0 and values.max() <= 1.0
    for i, sizes in enumerate(expected):
        for j in range(n):
            if j < len(sizes):
                h, w = sizes[j]
                assert mask[i, j, :h, :w].all() and int(mask[i, j].sum()) == h * w
            else:
                assert int(mask[i, j].sum()) == 0
        assert (values[i][mask[i].unsqueeze(1).expand_as(values[i]) == 0] == 0).all()  # padding is exactly 0


def test_threads_do_not_change_results(make_test_image):
    images = [[make_test_image(700, 300, "RGBA", 1), make_test_image(64, 900, "L", 2)], [make_test_image(1200, 800)]]
    serial = Idefics2ImageProcessor(do_image_splitting=True, num_threads=1)(images)
    threaded = Idefics2ImageProcessor(do_image_splitting=True, num_threads=4)(images)
    np.testing.assert_array_equal(serial["pixel_values"], threaded["pixel_values"])
    np.testing.assert_array_equal(serial["pixel_attention_mask"], threaded["pixel_attention_mask"])


def test_alpha_composite_table_is_pils_result(monkeypatch):
    from idefics2 import kernels
    from idefics2.image_processing import _pil_to_rgb

    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (300, 400, 4), dtype=np.uint8), "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    converted = _pil_to_rgb(rgba)  # RGBX over the compiled kernel's buffer, else RGB
    assert converted.mode == ("RGBX" if kernels.kernel_available() else "RGB")
    np.testing.assert_array_equal(np.asarray(converted)[..., :3], expected)
    monkeypatch.setattr(kernels, "composite_on_white", lambda rgba, table: None)  # the numpy path
    converted = _pil_to_rgb(rgba)
    assert converted.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(converted), expected)


def test_compiled_and_numpy_paths_give_the_same_pixels(ours, make_test_image, monkeypatch):
    from idefics2 import kernels

    images = [[make_test_image(700, 500), make_test_image(300, 200, "RGBA")], [make_test_image(64, 900, "LA")]]
    compiled = ours(images, return_tensors="np", do_image_splitting=True)
    monkeypatch.setattr(kernels, "lut_to_chw", lambda pixels, lut, out: False)
    monkeypatch.setattr(kernels, "composite_on_white", lambda rgba, table: None)
    plain = ours(images, return_tensors="np", do_image_splitting=True)
    assert np.array_equal(compiled["pixel_values"], plain["pixel_values"])
    assert np.array_equal(compiled["pixel_attention_mask"], plain["pixel_attention_mask"])
