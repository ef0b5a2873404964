"""`Idefics2ImageProcessor`: images -> `pixel_values` [B, N, 3, H, W] float32 and `pixel_attention_mask` [B, N, H, W].

Bit-exact with transformers 5.24's `Idefics2ImageProcessorPil` (the PIL/NumPy backend) and much faster:

* RGB conversion, splitting and resizing run on PIL images (the reference also resizes with PIL, so the bytes
  are identical); crops are PIL crops of the original, taken before resizing like the reference.
* Rescale + normalise only depend on the uint8 level after resizing, so they are one 256-entry float32 lookup
  table per channel, computed with the reference's exact arithmetic (x * scale in float64, cast to float32,
  then (x - mean) / std in float32). The table is applied straight into a preallocated, zero-filled padded
  output buffer: no float64 intermediates, no per-image pad, no final stack.

Reference behaviours kept on purpose (documented in the class docstring): the independent min-side clamp that
distorts aspect ratio, truncating `int()` sizes, float inputs in [0, 1] being rescaled twice unless
`do_rescale=False`, and alpha being composited onto white.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np
import PIL.Image
import torch

from . import kernels
from .batch_feature import BatchFeature
from .media import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, check_pixel_limit, open_image

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"

DEFAULT_SIZE = {"shortest_edge": 378, "longest_edge": 980}

# Keys of preprocessor_config.json this processor understands (others, like image_processor_type, are ignored).
CONFIG_KEYS = (
    "do_convert_rgb",
    "do_resize",
    "size",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_pad",
    "do_image_splitting",
)
CALL_KEYS = CONFIG_KEYS + ("max_image_pixels", "allow_remote_images", "num_threads")
# Per-image work (PIL resize/convert, numpy take) releases the GIL, so threads scale it over cores.
DEFAULT_MAX_THREADS = 8


def resize_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """The reference's target (height, width): cap the longest side at `longest_edge` keeping the aspect ratio
    (with truncating int()), then raise each side independently to at least `shortest_edge`. No other upscaling.
    `{"height": h, "width": w}` resizes to exactly that size."""
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest and longest:
        aspect = width / height
        if width >= height and width > longest:
            width, height = longest, int(longest / aspect)
        elif height > width and height > longest:
            height, width = longest, int(longest * aspect)
        return max(height, shortest), max(width, shortest)
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    raise ValueError(f"size must have 'shortest_edge' and 'longest_edge', or 'height' and 'width'; got {size}")


def split_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes (left, top, right, bottom) of the 4 quarters then the full image, reference order."""
    mid_w, mid_h = width // 2, height // 2
    return [
        (0, 0, mid_w, mid_h),
        (mid_w, 0, width, mid_h),
        (0, mid_h, mid_w, height),
        (mid_w, mid_h, width, height),
        (0, 0, width, height),
    ]


class _Source:
    """One input image after RGB conversion: a PIL RGB image (the fast path) or an HWC numpy array.

    A PIL input's conversion (`pending`) is done by the first render task that needs the pixels, not up front:
    the sizes are known without it, so converting and resizing one image overlap with other images' work
    instead of all conversions running before any resize."""

    def __init__(self, pil: PIL.Image.Image | None, array: np.ndarray | None, where: str,
                 pending: PIL.Image.Image | None = None) -> None:
        self._pil = pil
        self.array = array  # HWC, 3 channels, original dtype (non-uint8 or when there is no PIL image)
        self.where = where
        self._pending = pending
        self._lock = threading.Lock()  # the crops of one image may render on several threads

    @property
    def pil(self) -> PIL.Image.Image | None:
        if self._pending is not None:
            with self._lock:
                if self._pending is not None:
                    self._pil, self._pending = _pil_to_rgb(self._pending), None
        return self._pil

    @property
    def height(self) -> int:
        image = self._pending or self._pil
        return image.height if image is not None else self.array.shape[0]

    @property
    def width(self) -> int:
        image = self._pending or self._pil
        return image.width if image is not None else self.array.shape[1]


def _where(sample: int, index: int) -> str:
    return f"sample {sample}, image {index}"


def _infer_channels_last(array: np.ndarray, where: str) -> bool:
    """The reference's layout guess for 3-D arrays: channels first if the first axis has 1, 3 or 4 entries
    (also when both ends qualify), else channels last if the last one does."""
    if array.shape[0] in (1, 3, 4):
        return False
    if array.shape[-1] in (1, 3, 4):
        return True
    raise ValueError(
        f"{where}: cannot tell the channel axis of an array of shape {tuple(array.shape)}; expected (H, W), "
        "(H, W, C) or (C, H, W) with C in 1, 3, 4"
    )


def _composite_on_white(hwc: np.ndarray) -> np.ndarray:
    """4 channels -> 3, alpha-blended onto white, with the reference's arithmetic and rounding."""
    if np.issubdtype(hwc.dtype, np.integer):
        white = 255
        alpha = hwc[..., 3:4] / white
        blended = alpha * hwc[..., :3] + (1 - alpha) * white
        return np.round(blended).astype(hwc.dtype)
    low, high = hwc.min(), hwc.max()
    if low < 0.0 or high > 1.0:
        raise ValueError(f"a float RGBA image must be in [0, 1] to composite its alpha; got [{low}, {high}]")
    alpha = hwc[..., 3:4]
    return (alpha * hwc[..., :3] + (1 - alpha) * 1.0).astype(hwc.dtype)


def _array_from_input(image: Any, where: str) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype in (torch.bfloat16, torch.float16):
            image = image.float()
        image = image.numpy()
    if image.dtype == np.bool_ or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise TypeError(f"{where}: unsupported array dtype {image.dtype}; expected uint8, an integer or a float dtype")
    return image


def _is_image(value: Any) -> bool:
    return isinstance(value, (PIL.Image.Image, np.ndarray, torch.Tensor, str, bytes, os.PathLike))


def _is_batch_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4


def nest_images(images: Any) -> list[list[Any]]:
    """Normalise the accepted input structures to one list of images per sample.

    A single image -> one sample with one image; a list of images -> one sample; a list of lists -> one sample per
    inner list (inner lists may be empty); a 4-D array/tensor -> one sample of N images (a list of 4-D arrays ->
    one sample per array), as the reference does."""
    if _is_batch_array(images):
        return [list(images)]
    if _is_image(images):
        return [[images]]
    if not isinstance(images, (list, tuple)):
        raise TypeError(
            "images must be a PIL image, a numpy array, a torch tensor, a path / base64 string, a list of them, or a "
            f"list of lists of them (one list per sample); got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("images is an empty list: pass at least one image (or a list of per-sample lists)")
    per_sample = all(isinstance(sample, (list, tuple)) for sample in images)
    if per_sample or all(_is_batch_array(sample) for sample in images):
        nested = [list(sample) for sample in images]
    elif any(isinstance(sample, (list, tuple)) for sample in images):
        raise TypeError(
            "images mixes lists and single images at the top level: pass either a flat list of images (one sample) "
            "or a list of per-sample lists"
        )
    else:
        nested = [list(images)]
    for i, sample in enumerate(nested):
        for j, image in enumerate(sample):
            if not _is_image(image):
                raise TypeError(
                    f"{_where(i, j)}: expected a PIL image, a numpy array, a torch tensor or a path / base64 string, "
                    f"got {type(image).__name__}"
                )
    return nested


class Idefics2ImageProcessor:
    """Image processor for Idefics2, parity with transformers 5.24 `Idefics2ImageProcessorPil`.

    Pipeline per image: convert to RGB (alpha and palette transparency composited onto white; L, P, CMYK, I;16,
    ... through PIL's `convert("RGB")`; arrays: 1 channel repeated, 4 channels blended onto white), optionally
    split into 4 quarters + the full image (`do_image_splitting`), resize with PIL BILINEAR so the longest side
    is at most `size["longest_edge"]` (980) and each side at least `size["shortest_edge"]` (378, clamped per
    side: very thin images are stretched), rescale by `rescale_factor`, normalise with `image_mean` /
    `image_std`, and pad every image of the batch to the largest height and width at the top-left corner.

    Inputs: PIL images, numpy arrays or torch tensors in (H, W), (H, W, C) or (C, H, W) layout (C in 1, 3, 4;
    uint8, integer values in [0, 255], or floats), paths and base64 data URIs; a single image, a list (one
    sample) or a list of lists (one list per sample, counts may differ, including zero). Float arrays with
    values in [0, 1] must be passed with `do_rescale=False`, as in the reference (otherwise they are divided by
    255 a second time). Images above `max_image_pixels` pixels are refused (None disables the check).

    Output (`return_tensors` "pt", "np" or None = numpy): `pixel_values` float32 (B, N, 3, H, W) and
    `pixel_attention_mask` int64 (B, N, H, W) with N the largest image count of the batch (x5 with splitting);
    missing image slots are all zeros. With `do_pad=False`: a list of lists of (3, h, w) arrays, or a stacked
    tensor if all sizes agree and tensors are requested. Output is always float32 (the reference returns
    uint8/float64 in some `do_rescale=False` combinations).
    """

    model_input_names = ["pixel_values", "pixel_attention_mask"]

    def __init__(
        self,
        do_convert_rgb: bool = True,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = PIL.Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | list[float] = (0.5, 0.5, 0.5),
        image_std: float | list[float] = (0.5, 0.5, 0.5),
        do_pad: bool = True,
        do_image_splitting: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        allow_remote_images: bool = False,
        num_threads: int | None = None,
    ) -> None:
        self.do_convert_rgb = do_convert_rgb
        self.do_resize = do_resize
        self.size = dict(size) if size is not None else dict(DEFAULT_SIZE)
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if isinstance(image_mean, (list, tuple)) else image_mean
        self.image_std = list(image_std) if isinstance(image_std, (list, tuple)) else image_std
        self.do_pad = do_pad
        self.do_image_splitting = do_image_splitting
        self.max_image_pixels = max_image_pixels
        self.allow_remote_images = allow_remote_images
        self.num_threads = num_threads
        self._lut_cache: dict[tuple, np.ndarray] = {}

    # ----------------------------------------------------------------------------------------------- config I/O
    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json content (the hub's key set)."""
        config = {key: copy.deepcopy(getattr(self, key)) for key in CONFIG_KEYS}
        config["image_processor_type"] = "Idefics2ImageProcessor"
        config["processor_class"] = "Idefics2Processor"
        return dict(sorted(config.items()))

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> Idefics2ImageProcessor:
        kwargs = {key: config[key] for key in CONFIG_KEYS if key in config}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> Idefics2ImageProcessor:
        """Load `preprocessor_config.json` (hub / transformers 4 layout) or the `image_processor` entry of
        `processor_config.json` (transformers 5 layout) from a directory or a hub repo id."""
        directory = _resolve_directory(directory)
        config = read_image_processor_config(directory)
        return cls.from_dict(config, **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PREPROCESSOR_CONFIG)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
            handle.write("\n")
        return path

    def __repr__(self) -> str:
        return f"Idefics2ImageProcessor({json.dumps(self.to_dict(), sort_keys=True)})"

    # --------------------------------------------------------------------------------------------- processing
    def __call__(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Process one image, a list of images (one sample) or a list of per-sample lists. Any config key
        (`do_image_splitting`, `size`, `do_resize`, `image_mean`, ...) can be overridden for this call."""
        unknown = sorted(set(kwargs) - set(CALL_KEYS))
        if unknown:
            raise TypeError(f"unexpected image processor arguments {unknown}; accepted: {sorted(CALL_KEYS)}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        opts = {key: kwargs.get(key, getattr(self, key)) for key in CALL_KEYS}
        if opts["do_resize"]:
            resize_output_size(1, 1, opts["size"])  # validates the size dict up front
        mean = _per_channel(opts["image_mean"], "image_mean")
        std = _per_channel(opts["image_std"], "image_std")

        nested = nest_images(images)
        flat = [(image, _where(i, j)) for i, sample in enumerate(nested) for j, image in enumerate(sample)]
        workers = _thread_count(opts["num_threads"], len(flat))
        prepared = iter(_parallel_map(lambda item: self._prepare(item[0], item[1], opts), flat, workers))
        sources = [[next(prepared) for _ in sample] for sample in nested]
        # Plan: every crop's box and final size, so the padded buffer can be allocated before any resize.
        plans: list[list[tuple[_Source, tuple[int, int, int, int], tuple[int, int]]]] = []
        for sample in sources:
            plan = []
            for source in sample:
                if opts["do_image_splitting"]:
                    if source.width < 2 or source.height < 2:
                        raise ValueError(
                            f"{source.where}: a {source.width}x{source.height} image cannot be split into 4 "
                            "crops (do_image_splitting needs at least 2x2 pixels)"
                        )
                    boxes = split_boxes(source.width, source.height)
                else:
                    boxes = [(0, 0, source.width, source.height)]
                for box in boxes:
                    h, w = box[3] - box[1], box[2] - box[0]
                    target = resize_output_size(h, w, opts["size"]) if opts["do_resize"] else (h, w)
                    plan.append((source, box, target))
            plans.append(plan)

        for pre_scaled in (False, True):  # fill the LUT cache before the threads read it
            self._lut(pre_scaled, mean, std, opts)
        if not opts["do_pad"]:
            rendered = iter(_parallel_map(lambda task: self._render(*task, mean, std, opts),
                                          [task for plan in plans for task in plan], workers))
            arrays = [[next(rendered) for _ in plan] for plan in plans]
            return _unpadded_output(arrays, return_tensors)

        n_images = max(len(plan) for plan in plans)
        if n_images == 0:
            raise ValueError("no images to process: every sample has an empty image list")
        max_h = max(tgt[0] for plan in plans for _, _, tgt in plan)
        max_w = max(tgt[1] for plan in plans for _, _, tgt in plan)
        pixel_values = np.zeros((len(plans), n_images, 3, max_h, max_w), dtype=np.float32)
        pixel_mask = np.zeros((len(plans), n_images, max_h, max_w), dtype=np.int64)

        def render_into(task: tuple[int, int, _Source, tuple[int, int, int, int], tuple[int, int]]) -> None:
            i, j, source, box, (h, w) = task  # each task writes its own slot: no two threads share memory
            self._render(source, box, (h, w), mean, std, opts, out=pixel_values[i, j, :, :h, :w])
            pixel_mask[i, j, :h, :w] = 1

        tasks = [(i, j, *task) for i, plan in enumerate(plans) for j, task in enumerate(plan)]
        # Largest first, so one big image does not run alone at the end.
        tasks.sort(key=lambda task: -(task[3][2] - task[3][0]) * (task[3][3] - task[3][1]))
        _parallel_map(render_into, tasks, workers)
        return BatchFeature({"pixel_values": pixel_values, "pixel_attention_mask": pixel_mask}, return_tensors)

    # ---------------------------------------------------------------------------------------- per-image steps
    def _prepare(self, image: Any, where: str, opts: dict[str, Any]) -> _Source:
        """Input -> RGB, as a PIL image when the pixels are uint8 (so crops and resizes stay in PIL)."""
        if isinstance(image, (str, bytes, os.PathLike)):
            try:
                image = open_image(
                    image, allow_remote=opts["allow_remote_images"], max_image_pixels=opts["max_image_pixels"]
                )
            except ImageLoadError as exc:
                raise ImageLoadError(f"{where}: {exc}") from exc
        if isinstance(image, PIL.Image.Image):
            _check_size(image.width, image.height, where, opts)
            if opts["do_convert_rgb"]:
                return _Source(pil=None, array=None, where=where, pending=image)
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[2] != 3:
                raise ValueError(
                    f"{where}: a {image.mode} image has {1 if array.ndim == 2 else array.shape[2]} channel(s); "
                    "with do_convert_rgb=False images must already have 3 channels"
                )
            return self._source_from_hwc(array, where)
        array = _array_from_input(image, where)
        if array.ndim == 2:
            array = array[:, :, None]
        elif array.ndim == 3:
            if not _infer_channels_last(array, where):
                array = np.moveaxis(array, 0, -1)
        else:
            raise ValueError(
                f"{where}: expected a 2-D (H, W) or 3-D (H, W, C) / (C, H, W) array, got shape {tuple(array.shape)}"
            )
        _check_size(array.shape[1], array.shape[0], where, opts)
        channels = array.shape[2]
        if channels not in (1, 3, 4):
            raise ValueError(f"{where}: expected 1, 3 or 4 channels, got {channels} (shape {tuple(image.shape)})")
        if opts["do_convert_rgb"]:
            if channels == 1:
                array = np.repeat(array, 3, axis=2)
            elif channels == 4:
                try:
                    array = _composite_on_white(array)
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from exc
        elif channels != 3:
            raise ValueError(
                f"{where}: the array has {channels} channel(s); with do_convert_rgb=False images must have 3 channels"
            )
        return self._source_from_hwc(array, where)

    @staticmethod
    def _source_from_hwc(array: np.ndarray, where: str) -> _Source:
        if array.dtype == np.uint8:
            return _Source(pil=PIL.Image.fromarray(np.ascontiguousarray(array), mode="RGB"), array=None, where=where)
        return _Source(pil=None, array=array, where=where)

    def _render(
        self,
        source: _Source,
        box: tuple[int, int, int, int],
        target: tuple[int, int],
        mean: np.ndarray,
        std: np.ndarray,
        opts: dict[str, Any],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Crop, resize, rescale and normalise one image into `out` (3, h, w) float32 (allocated if None)."""
        h, w = target
        if out is None:
            out = np.empty((3, h, w), dtype=np.float32)
        full = box == (0, 0, source.width, source.height)
        if source.pil is not None:
            pil, pre_scaled = (source.pil if full else source.pil.crop(box)), False
        elif opts["do_resize"]:
            crop = source.array if full else source.array[box[1] : box[3], box[0] : box[2]]
            try:
                crop, pre_scaled = _uint8_for_pil(crop)
            except ValueError as exc:
                raise ValueError(f"{source.where}: {exc}") from exc
            pil = PIL.Image.fromarray(crop, mode="RGB")
        else:
            crop = source.array if full else source.array[box[1] : box[3], box[0] : box[2]]
            out[...] = _float_pipeline(crop, mean, std, opts)
            return out
        if opts["do_resize"] and pil.size != (w, h):  # a same-size PIL resize is a copy: skip it
            pil = pil.resize((w, h), resample=PIL.Image.Resampling(opts["resample"]))
        lut = self._lut(pre_scaled, mean, std, opts)
        # PIL's own pixel memory where it can be shared (saves a copy of the image); `view` keeps it alive
        view = _rgbx_view(pil)
        pixels = view[0] if view is not None else np.asarray(pil)  # (H, W, 4) RGBX or (H, W, 3)
        if not kernels.lut_to_chw(pixels, lut, out):  # one pass in C++; numpy where it is not built
            for c in range(3):
                # mode="clip" makes numpy write straight into the strided view (uint8 indices are always in range)
                np.take(lut[c], pixels[:, :, c], out=out[c], mode="clip")
        return out

    def _lut(self, pre_scaled: bool, mean: np.ndarray, std: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
        """(3, 256) float32: the reference's rescale + normalise of each uint8 level, bit for bit."""
        key = (pre_scaled, opts["do_rescale"], opts["rescale_factor"], opts["do_normalize"],
               tuple(mean.tolist()), tuple(std.tolist()))
        lut = self._lut_cache.get(key)
        if lut is None:
            levels = np.arange(256, dtype=np.uint8)[None, :, None]  # shaped like one (1, 256, 1) HWC image
            if pre_scaled:  # float [0, 1] inputs: the reference divides by 255 after its uint8 round trip
                levels = (levels.astype(np.float64) * (1 / 255)).astype(np.float32)
            levels = np.repeat(levels, 3, axis=2)
            lut = np.ascontiguousarray(_float_pipeline(levels, mean, std, opts)[:, 0, :])
            self._lut_cache[key] = lut
        return lut


def _check_size(width: int, height: int, where: str, opts: dict[str, Any]) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"{where}: the image is empty ({width}x{height} pixels)")
    try:
        check_pixel_limit(width, height, opts["max_image_pixels"])
    except ImageLoadError as exc:
        raise ImageLoadError(f"{where}: {exc}") from exc


def _thread_count(requested: int | None, n_tasks: int) -> int:
    if requested is not None:
        return max(1, int(requested))
    return max(1, min(n_tasks, os.cpu_count() or 1, DEFAULT_MAX_THREADS))


def _parallel_map(fn: Any, items: list[Any], workers: int) -> list[Any]:
    """`[fn(x) for x in items]`, on `workers` threads; the first failing item (in order) raises."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


@lru_cache(maxsize=1)
def _white_composite_table() -> np.ndarray:
    """(256 * 256,) uint8: PIL's `alpha_composite(white, pixel)` colour for every (alpha, value) pair, made by
    PIL itself so it is exact by construction. Over an opaque white background the result of a channel only
    depends on that channel and the alpha, so one table serves R, G and B."""
    alpha, value = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    grid = np.stack([value, value, value, alpha], axis=-1)
    white = PIL.Image.new("RGBA", (256, 256), (255, 255, 255, 255))
    composited = PIL.Image.alpha_composite(white, PIL.Image.fromarray(grid, "RGBA"))
    return np.ascontiguousarray(np.asarray(composited)[..., 0]).reshape(-1)


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """The reference's RGB conversion for PIL images: transparency composited onto white, else convert.
    Compositing uses a table of PIL's own results (bit-identical, about 2x faster than PIL's per-pixel division)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = np.asarray(image.convert("RGBA") if image.mode != "RGBA" else image)
        table = _white_composite_table()
        rgbx = kernels.composite_on_white(rgba, table)  # one pass in C++; numpy where it is not built
        if rgbx is not None:
            # An "RGBX" image over the array, no copy: PIL's crops and resizes treat it exactly as "RGB" (whose
            # pixels PIL stores as 4 bytes too), and `_render` reads the first three channels.
            height, width = rgbx.shape[:2]
            return PIL.Image.frombuffer("RGBX", (width, height), rgbx, "raw", "RGBX", 0, 1)
        index = rgba[..., 3].astype(np.uint16) << 8
        rgb = np.empty(rgba.shape[:2] + (3,), dtype=np.uint8)
        for c in range(3):
            np.take(table, index | rgba[..., c], out=rgb[..., c], mode="clip")
        return PIL.Image.fromarray(rgb, "RGB")
    if image.mode == "RGB":
        return image  # later steps (crop, resize, asarray) never modify it, so no copy is needed
    return image.convert("RGB")


class _ArrowArray(ctypes.Structure):
    """The Arrow C data interface's ArrowArray (https://arrow.apache.org/docs/format/CDataInterface.html)."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _rgbx_view(image: PIL.Image.Image) -> tuple[np.ndarray, object] | None:
    """An (H, W, 4) uint8 view of an RGB/RGBX image's own memory (PIL keeps RGB as 4 bytes a pixel) through
    Pillow's Arrow export (Pillow >= 11.2; one memory block: images up to 16 MiB), plus the object that keeps
    the memory alive while the view is used; None where that is not possible (then use np.asarray)."""
    if image.mode not in ("RGB", "RGBX") or not hasattr(image, "__arrow_c_array__"):
        return None
    try:
        schema, capsule = image.__arrow_c_array__()
    except ValueError:  # rows in several blocks
        return None
    array = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
    width, height = image.size
    if array.length != width * height or array.offset != 0 or array.n_children != 1:
        return None
    child = array.children[0].contents  # the fixed-size lists' values: 4 bytes a pixel
    if child.length != 4 * width * height or child.offset != 0 or child.n_buffers != 2 or not child.buffers[1]:
        return None
    view = np.ctypeslib.as_array((ctypes.c_uint8 * (4 * width * height)).from_address(child.buffers[1]))
    return view.reshape(height, width, 4), (schema, capsule, image)


def _uint8_for_pil(crop: np.ndarray) -> tuple[np.ndarray, bool]:
    """The reference's conversion of a non-uint8 array to uint8 before a PIL resize: integer-valued data in
    [0, 255] is truncated to uint8; float data in [0, 1] is multiplied by 255 first (and divided back after the
    resize, which is the `pre_scaled` flag). Decided per crop, as the reference does."""
    if np.allclose(crop, crop.astype(int)):
        if np.all(crop >= 0) and np.all(crop <= 255):
            return np.ascontiguousarray(crop.astype(np.uint8)), False
        raise ValueError(f"pixel values must be in [0, 255] for integer data; got [{crop.min()}, {crop.max()}]")
    if np.all(crop >= 0) and np.all(crop <= 1):
        scaled = (crop.astype(np.float64) * 255).astype(np.float32)
        return np.ascontiguousarray(scaled.astype(np.uint8)), True
    raise ValueError(
        f"float pixel values must be in [0, 1] or integer-valued in [0, 255]; got [{crop.min()}, {crop.max()}]"
    )


def _float_pipeline(hwc: np.ndarray, mean: np.ndarray, std: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
    """Rescale and normalise an HWC array with the reference's dtypes; returns CHW."""
    x = hwc
    if opts["do_rescale"]:
        x = (x.astype(np.float64) * opts["rescale_factor"]).astype(np.float32)
    if opts["do_normalize"]:
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        x = (x - mean.astype(x.dtype)) / std.astype(x.dtype)
    return np.moveaxis(x, -1, 0).astype(np.float32, copy=False)


def _per_channel(value: float | list[float], name: str) -> np.ndarray:
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * 3
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel) or be a single number, got {value}")
    return np.asarray(values, dtype=np.float64)


def _unpadded_output(arrays: list[list[np.ndarray]], return_tensors: str | None) -> BatchFeature:
    if return_tensors is None:
        return BatchFeature({"pixel_values": arrays})
    shapes = {a.shape for sample in arrays for a in sample}
    counts = {len(sample) for sample in arrays}
    if len(shapes) > 1 or len(counts) > 1:
        raise ValueError(
            f"do_pad=False with return_tensors={return_tensors!r} needs every image of the same size and every "
            f"sample with the same image count; got sizes {sorted(shapes)} and counts {sorted(counts)}. "
            "Use do_pad=True (the default) or return_tensors=None"
        )
    stacked = np.stack([np.stack(sample) for sample in arrays])
    return BatchFeature({"pixel_values": stacked}, return_tensors)


# ------------------------------------------------------------------------------------------------ config files
def _resolve_directory(directory: str | os.PathLike) -> str:
    """A local directory as-is; otherwise a hub repo id, downloaded (config files only) with huggingface_hub."""
    directory = os.fspath(directory)
    if os.path.isdir(directory):
        return directory
    if directory.count("/") == 1 and not os.path.exists(directory):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
            raise FileNotFoundError(f"{directory!r} is not a directory") from exc
        return snapshot_download(directory, allow_patterns=["*.json", "*.jinja"])
    raise FileNotFoundError(f"{directory!r} is not a directory (nor a hub repo id like 'HuggingFaceM4/idefics2-8b')")


def read_image_processor_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, PREPROCESSOR_CONFIG)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    path = os.path.join(directory, PROCESSOR_CONFIG)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        if isinstance(config.get("image_processor"), dict):
            return config["image_processor"]
    raise FileNotFoundError(
        f"no image processor config in {directory}: expected {PREPROCESSOR_CONFIG} or an 'image_processor' entry "
        f"in {PROCESSOR_CONFIG}"
    )
