"""Loading images from the forms users pass: PIL images, local paths, base64 / data URIs and (opt-in) URLs.

Remote fetching is off unless the caller enables it (`allow_remote=True`), so a prompt or a chat message can
never make the process reach the network on its own. Every loaded image is checked against a pixel limit
before it is decoded (decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.request
from typing import Any

import PIL.Image
import PIL.ImageOps

# PIL raises DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS; use the same bound by default.
DEFAULT_MAX_IMAGE_PIXELS: int = 178_956_970
DEFAULT_URL_TIMEOUT_S: float = 10.0
MAX_DOWNLOAD_BYTES: int = 256 * 1024 * 1024


class ImageLoadError(ValueError):
    """An image source that cannot be turned into an image (bad path, not an image, too large, ...)."""


def is_url(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith("http://") or value.startswith("https://"))


def check_pixel_limit(width: int, height: int, max_image_pixels: int | None, what: str = "image") -> None:
    """Refuse images with more than `max_image_pixels` pixels (None disables the check)."""
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ImageLoadError(
            f"{what} is {width}x{height} = {width * height:,} pixels, more than max_image_pixels="
            f"{max_image_pixels:,}; raise max_image_pixels (or pass None) if this image is trusted"
        )


def _open_bytes(data: bytes, what: str, max_image_pixels: int | None) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{what}: {exc}") from exc
    except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageLoadError(f"{what} is not an image PIL can read ({exc})") from exc
    check_pixel_limit(image.width, image.height, max_image_pixels, what)  # header only: nothing decoded yet
    try:
        image.load()
    except (OSError, ValueError) as exc:
        raise ImageLoadError(f"{what} could not be decoded ({exc})") from exc
    return image


def fetch_url(url: str, timeout: float = DEFAULT_URL_TIMEOUT_S, max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
    """The body of an http(s) URL, at most `max_bytes` (callers decide whether fetching is allowed)."""
    request = urllib.request.Request(url, headers={"User-Agent": "idefics2"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only, checked)
        data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageLoadError(f"{url}: more than {max_bytes} bytes")
    return data


def open_image(
    source: str | bytes | PIL.Image.Image,
    *,
    allow_remote: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    timeout: float = DEFAULT_URL_TIMEOUT_S,
) -> PIL.Image.Image:
    """A PIL image from a PIL image, raw bytes, a local path, a `data:image/...;base64,` URI, a bare base64
    string, or an http(s) URL (only with `allow_remote=True`). The pixels are left as stored (no mode change)."""
    if isinstance(source, PIL.Image.Image):
        check_pixel_limit(source.width, source.height, max_image_pixels)
        return source
    if isinstance(source, (bytes, bytearray)):
        return _open_bytes(bytes(source), "image bytes", max_image_pixels)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(
            "an image must be a PIL image, a numpy array, a torch tensor, a path, a base64 data URI or a URL; "
            f"got {type(source).__name__}"
        )
    if is_url(source):
        if not allow_remote:
            raise ImageLoadError(
                f"refusing to download {source!r}: remote images are disabled; enable them explicitly "
                "(allow_remote_images=True on the processor) or pass a local path or a PIL image"
            )
        try:
            data = fetch_url(source, timeout)
        except OSError as exc:
            raise ImageLoadError(f"could not download {source!r}: {exc}") from exc
        return _open_bytes(data, source, max_image_pixels)
    if os.path.isfile(source):
        with open(source, "rb") as handle:
            return _open_bytes(handle.read(), source, max_image_pixels)
    payload = source
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ImageLoadError(f"data URI {header[:40]!r}... is not base64-encoded")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        shown = source if len(source) <= 60 else source[:57] + "..."
        raise ImageLoadError(
            f"image source {shown!r} is neither an existing file, a base64 / data URI image nor an http(s) URL"
        )
    return _open_bytes(data, "base64 image", max_image_pixels)


def load_image_like_reference(
    source: Any,
    *,
    allow_remote: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> PIL.Image.Image:
    """What transformers' `Idefics2Processor` does to every image: open it, apply the EXIF orientation, then
    `convert("RGB")`. Note that this plain conversion drops an alpha channel (transparent pixels keep their
    stored colour); only the image processor called directly composites alpha onto white."""
    image = open_image(source, allow_remote=allow_remote, max_image_pixels=max_image_pixels)
    image = PIL.ImageOps.exif_transpose(image)
    return image.convert("RGB")
