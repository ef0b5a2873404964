"""Image preprocessing throughput: idefics2 vs transformers 5.24 (`Idefics2ImageProcessorPil`), one run.

    OMP_NUM_THREADS=1 python benchmarks/image_processing.py [--repeats 3]

16 mixed photos-like images (640x480, 1920x1080, 300x2000, 378x378, 4000x3000, ...; RGB, RGBA, L) in one
batch of 4 samples, with the idefics2-8b preprocessor config, image splitting off and on. Both processors get
the same PIL images; the script checks the outputs are identical (max |diff| and mask equality) and prints
images/s (input images per second, best of --repeats) and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
from PIL import Image

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "idefics2-8b")
SIZES = [
    (640, 480), (1920, 1080), (300, 2000), (378, 378), (1024, 768), (800, 1200), (4000, 3000), (512, 512),
    (1280, 720), (2000, 500), (100, 80), (981, 500), (3024, 4032), (720, 1280), (1600, 1067), (224, 224),
]
MODES = ["RGB"] * 12 + ["RGBA", "L", "RGBA", "P"]


def make_images() -> list[Image.Image]:
    """Photo-like content (smooth gradients + noise) so resampling does real work."""
    rng = np.random.default_rng(0)
    images = []
    for (width, height), mode in zip(SIZES, MODES):
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
        noise = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
        rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(rgb, "RGB")
        if mode == "RGBA":
            image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        elif mode != "RGB":
            image = image.convert(mode)
        images.append(image)
    return images


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="our per-image worker threads (default: min(8, cores)); the reference is serial")
    args = parser.parse_args()

    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    from idefics2.image_processing import Idefics2ImageProcessor

    reference = Idefics2ImageProcessorPil.from_pretrained(FIXTURE)
    ours = Idefics2ImageProcessor.from_pretrained(FIXTURE, num_threads=args.threads)
    images = make_images()
    batch = [images[0:4], images[4:8], images[8:12], images[12:16]]
    n_images = len(images)
    print(f"ours: {args.threads or 'auto'} threads on {os.cpu_count()} cores; reference: serial")
    print(f"{n_images} images in 4 samples: " + ", ".join(f"{w}x{h}" for w, h in SIZES))
    print(f"{'splitting':<10} {'ours img/s':>11} {'reference img/s':>16} {'speed-up':>9} {'max |diff|':>11} "
          f"{'masks equal':>12}  pixel_values shape")
    for splitting in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_s, ref_out = best_time(lambda s=splitting: reference(batch, do_image_splitting=s), args.repeats)
        our_s, our_out = best_time(lambda s=splitting: ours(batch, do_image_splitting=s), args.repeats)
        diff = float(np.abs(ref_out["pixel_values"] - our_out["pixel_values"]).max())
        masks_equal = bool(np.array_equal(ref_out["pixel_attention_mask"], our_out["pixel_attention_mask"]))
        if diff > 1e-6 or not masks_equal:
            raise SystemExit(f"outputs differ (splitting={splitting}): max |diff| {diff}, masks equal {masks_equal}")
        print(f"{str(splitting):<10} {n_images / our_s:>11.1f} {n_images / ref_s:>16.1f} {ref_s / our_s:>8.1f}x "
              f"{diff:>11.1e} {str(masks_equal):>12}  {tuple(our_out['pixel_values'].shape)}")


if __name__ == "__main__":
    main()
