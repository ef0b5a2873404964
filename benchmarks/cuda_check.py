"""CUDA checks and figures, for a machine with an NVIDIA GPU (CI has none, so this is a script, not a test).

Everything is compared with transformers (the reference) on the same GPU in the same run:
  1. parity: fp32 logits (eager, sdpa) on a padded two-image batch, bf16 logits, greedy ids;
  2. flash-attn 2: used where installed, else the clear error;
  3. bitsandbytes 4-bit nf4 / 8-bit on CUDA: logits against transformers' bnb model;
  4. device_map mixing cuda and cpu, and "auto": logits equal to the one-device model;
  5. decode speed (bf16, greedy, a fixed number of new tokens) at batch 1 and 8 on the `medium` preset
     (and with --real-size on idefics2-8b shapes, random weights made on the GPU), ours / transformers as a
     ratio, plus the peak GPU memory of each.
Prints one JSON line per check; exits non-zero when a parity check fails.

    python benchmarks/cuda_check.py [--skip-speed] [--real-size] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from reference import left_pad, make_prompt, pad_images, reference_model, tiny_config_dict  # noqa: E402

import idefics2  # noqa: E402

FIXTURE_8B = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "idefics2-8b")
FAILURES: list[str] = []
DEVICE = "cuda"  # --device cpu: a dry run of the same steps on a machine without a GPU


def report(name: str, ok: bool | None = None, **figures) -> None:
    if ok is False:
        FAILURES.append(name)
    print(json.dumps({"check": name, "ok": ok, **figures}), flush=True)


def batch_inputs(config: dict, device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids, mask = left_pad([make_prompt(g, config, 1, 5), make_prompt(g, config, 2, 3)])
    pixels, pixel_mask = pad_images(g, [[(56, 42)], [(28, 56), (42, 42)]])
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                                 pixel_attention_mask=pixel_mask).items()}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if DEVICE == "cuda" else None


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float().cpu()


def parity_checks(path: str, config: dict) -> None:
    import transformers

    device = torch.device(DEVICE)
    inputs = batch_inputs(config, device)
    for attn in ("eager", "sdpa"):
        ours = idefics2.Idefics2ForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, device_map=DEVICE, attn_implementation=attn)
        ref = transformers.Idefics2ForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn).to(device).eval()
        diff = (logits_of(ours, inputs) - logits_of(ref, inputs)).abs().max().item()
        report(f"fp32 logits {attn}", diff <= 1e-4, max_abs_diff=diff, device=str(ours.device))
        if attn == "sdpa":
            mine = ours.generate(**inputs, max_new_tokens=16, do_sample=False)
            theirs = ref.generate(**inputs, max_new_tokens=16, do_sample=False)
            report("fp32 greedy ids", torch.equal(mine.cpu(), theirs.cpu()), new_tokens=16)
            fp32_ref = logits_of(ref, inputs)
    ours = idefics2.Idefics2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, device_map=DEVICE)
    ref = transformers.Idefics2ForConditionalGeneration.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa").to(device).eval()
    ours_bf16, ref_bf16 = logits_of(ours, inputs), logits_of(ref, inputs)
    diff = (ours_bf16 - ref_bf16).abs().max().item()
    scale = (ref_bf16 - fp32_ref).abs().max().item()  # the reference's own bf16 rounding error
    report("bf16 logits", diff <= max(2 * scale, 1e-2), max_abs_diff=diff, reference_bf16_vs_fp32=scale)
    mine = ours.generate(**inputs, max_new_tokens=8, do_sample=False)
    theirs = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    report("bf16 greedy ids (informational: near-ties may differ)", None,
           equal=bool(torch.equal(mine.cpu(), theirs.cpu())))

    # flash-attn 2: bf16 on CUDA where installed, else a clear error.
    try:
        ours.set_attn_implementation("flash_attention_2")
        diff = (logits_of(ours, inputs) - ref_bf16).abs().max().item()
        report("flash_attention_2 bf16 logits", diff <= max(2 * scale, 1e-2), max_abs_diff=diff)
    except ValueError as error:
        report("flash_attention_2 unavailable -> clear error", "not available" in str(error), error=str(error))


def bnb_checks(path: str, config: dict) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        report("bitsandbytes", None, skipped=str(error))
        return
    import transformers

    device = torch.device(DEVICE)
    g = torch.Generator().manual_seed(0)
    inputs = dict(input_ids=make_prompt(g, config, 1, 9)[None].to(device),
                  pixel_values=torch.rand(1, 1, 3, 56, 56, generator=g).to(device))
    skip = ["model.vision_model", "model.connector", "lm_head"]
    settings = {
        "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16),
        "int8": dict(load_in_8bit=True),
    }
    for kind, kwargs in settings.items():
        ours = idefics2.Idefics2ForConditionalGeneration.from_pretrained(
            path, dtype=torch.float16 if kind == "int8" else torch.float32, device_map=DEVICE,
            quantization_config=idefics2.BitsAndBytesConfig(**kwargs))
        ref = transformers.Idefics2ForConditionalGeneration.from_pretrained(
            path, dtype=torch.float16 if kind == "int8" else torch.float32, device_map=DEVICE,
            quantization_config=transformers.BitsAndBytesConfig(**kwargs, llm_int8_skip_modules=skip)).eval()
        q = ours.model.text_model.layers[0].self_attn.q_proj
        diff = (logits_of(ours, inputs) - logits_of(ref, inputs)).abs().max().item()
        report(f"bnb {kind} on cuda logits", diff <= 1e-3, max_abs_diff=diff, layer=type(q).__name__,
               weight_device=str(q.weight.device))
        out = ours.generate(**inputs, max_new_tokens=4)
        report(f"bnb {kind} generate", out.shape[1] == inputs["input_ids"].shape[1] + 4)


def device_map_checks(path: str, config: dict) -> None:
    inputs = batch_inputs(config, "cpu")
    plain = idefics2.Idefics2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    expected = logits_of(plain, inputs)
    expected_ids = plain.generate(**inputs, max_new_tokens=8, do_sample=False)
    maps = {
        "vision cuda, connector cpu, text cuda, lm_head cpu": {
            "model.vision_model": "cuda:0", "model.connector": "cpu", "model.text_model": "cuda:0",
            "lm_head": "cpu"},
        "layers split cuda/disk": {
            "model.vision_model": "cpu", "model.connector": "cuda:0", "model.text_model.embed_tokens": "cuda:0",
            "model.text_model.layers.0": "cuda:0", "model.text_model.layers.1": "disk",
            "model.text_model.norm": "cuda:0", "lm_head": "cuda:0"},
        "auto": "auto",
    }
    weights = sum(p.numel() * p.element_size() for p in plain.parameters())
    # max_memory makes "auto" plan a dict: 40% of the weights on the GPU, the rest in RAM (offloaded per call).
    planned = {"auto, max_memory GPU 40% + cpu": {0: int(0.4 * weights), "cpu": "8GiB"}}
    for name, device_map in [*maps.items(), *((k, "auto") for k in planned)]:
        extra = {"max_memory": planned[name]} if name in planned else {}
        model = idefics2.Idefics2ForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, device_map=device_map, **extra)
        devices = sorted({str(p.device) for p in model.parameters()})
        here = {k: v.to(model.device) for k, v in inputs.items()}  # "auto" on one GPU adds no hooks
        diff = (logits_of(model, here) - expected).abs().max().item()
        ids = model.generate(**here, max_new_tokens=8, do_sample=False)
        report(f"device_map {name}", diff <= 1e-4 and torch.equal(ids.cpu(), expected_ids), max_abs_diff=diff,
               devices=devices)


def torchvision_processor_check() -> None:
    """Informational: where torchvision is installed transformers' AutoProcessor defaults to its torchvision
    image processor; how far is it from the PIL one (our parity target, which we match to 1e-6)?"""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    default = AutoProcessor.from_pretrained(FIXTURE_8B)
    ours = idefics2.Idefics2Processor.from_pretrained(FIXTURE_8B)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((480, 640), (1080, 1920))]
    text = ["<image>Hi", "<image>Yo"]
    theirs = default(text=text, images=[[i] for i in images], return_tensors="pt", padding=True)
    mine = ours(text=text, images=[[i] for i in images], return_tensors="pt", padding=True)
    same_shape = theirs["pixel_values"].shape == mine["pixel_values"].shape
    report("transformers' default image processor here", None,
           image_processor=type(default.image_processor).__name__,
           max_abs_diff_to_ours=(theirs["pixel_values"] - mine["pixel_values"]).abs().max().item() if same_shape
           else f"shapes {tuple(theirs['pixel_values'].shape)} vs {tuple(mine['pixel_values'].shape)}",
           ids_equal=bool(torch.equal(theirs["input_ids"], mine["input_ids"])))


def time_generation(label: str, loaders: dict, processor, new_tokens: int, batches: tuple[int, ...]) -> None:
    """Prefill latency and decode tokens/s of each model (bf16, greedy, exactly `new_tokens` new tokens)."""
    from PIL import Image

    image = Image.new("RGB", (378, 378), (120, 30, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    device = torch.device(DEVICE)
    results: dict[str, dict] = {}
    for name, load in loaders.items():
        model = load()
        for batch in batches:
            inputs = processor(text=[prompt] * batch, images=[[image]] * batch, return_tensors="pt",
                               do_image_splitting=False)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
                sync()
                reset_peak()
                best_total = best_prefill = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
                    sync()
                    prefill = time.perf_counter() - start
                    start = time.perf_counter()
                    out = model.generate(**inputs, **kwargs)
                    sync()
                    best_total = min(best_total, time.perf_counter() - start)
                    best_prefill = min(best_prefill, prefill)
            assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
            decode_s = max(best_total - best_prefill, 1e-9)
            results.setdefault(name, {})[batch] = dict(
                prefill_s=round(best_prefill, 4), decode_tok_s=round(batch * (new_tokens - 1) / decode_s, 1),
                peak_gib=peak_gib())
        del model
        reset_peak()
    for batch in batches:
        o, t = results["ours"][batch], results["transformers"][batch]
        report(f"bf16 decode speed batch {batch} ({label})", None, ours=o, transformers=t,
               decode_ratio=round(o["decode_tok_s"] / t["decode_tok_s"], 2),
               prefill_ratio=round(t["prefill_s"] / o["prefill_s"], 2))


def medium_speed(new_tokens: int) -> None:
    import transformers

    from idefics2.cli import main as cli_main

    path = os.path.join(tempfile.mkdtemp(), "medium")
    cli_main(["init-random", "--preset", "medium", path])
    loaders = {
        "ours": lambda: idefics2.Idefics2ForConditionalGeneration.from_pretrained(
            path, dtype=torch.bfloat16, device_map=DEVICE),
        "transformers": lambda: transformers.Idefics2ForConditionalGeneration.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation="sdpa").to(DEVICE).eval(),
    }
    time_generation("medium preset", loaders, idefics2.Idefics2Processor.from_pretrained(path), new_tokens, (1, 8))


def real_size_speed(new_tokens: int, fixture: str = FIXTURE_8B) -> None:
    """idefics2-8b shapes with random weights made on the device (no 16 GB checkpoint to write)."""
    import transformers

    def build(make):
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(DEVICE):
                return make().eval()
        finally:
            torch.set_default_dtype(torch.float32)

    loaders = {
        "ours": lambda: build(lambda: idefics2.Idefics2ForConditionalGeneration(
            idefics2.Idefics2Config.from_pretrained(fixture))),
        "transformers": lambda: build(lambda: transformers.Idefics2ForConditionalGeneration._from_config(
            transformers.Idefics2Config.from_pretrained(fixture), attn_implementation="sdpa", dtype=torch.bfloat16)),
    }
    time_generation("idefics2-8b shapes", loaders, idefics2.Idefics2Processor.from_pretrained(fixture),
                    new_tokens, (1, 8))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--real-size", action="store_true", help="also time idefics2-8b shapes (about 35 GB)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--device cpu for a dry run)", file=sys.stderr)
        return 2
    import transformers

    report("environment", None, gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else None, torch=torch.__version__,
           transformers=transformers.__version__)
    torch.backends.cudnn.allow_tf32 = False  # the patch-embedding convolution: compare fp32 with fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    config = tiny_config_dict()
    # bitsandbytes' kernels like dimensions that are multiples of 64/128.
    config["text_config"].update(hidden_size=128, intermediate_size=256)
    config["perceiver_config"]["hidden_size"] = 128
    with tempfile.TemporaryDirectory() as path:
        reference_model(config, seed=5).save_pretrained(path)
        steps = (parity_checks, bnb_checks, device_map_checks) if DEVICE == "cuda" else (parity_checks,)
        for step in (*steps, torchvision_processor_check):
            try:
                step(path, config) if step is not torchvision_processor_check else step()
            except Exception as error:  # one broken step should not hide the others' figures
                report(step.__name__, False, error=f"{type(error).__name__}: {error}")
    speed = [] if args.skip_speed else [medium_speed] + ([real_size_speed] if args.real_size else [])
    for step in speed:
        try:
            step(args.new_tokens)
        except Exception as error:
            report(step.__name__, False, error=f"{type(error).__name__}: {error}")
    print(json.dumps({"failures": FAILURES}))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    raise SystemExit(main())
