"""Prefill latency and decode speed: idefics2 vs transformers generate, measured in one run.

    python benchmarks/generate.py [--preset medium] [--dtypes float32,bfloat16] [--batches 1,8] [--new-tokens 64]
                                  [--prefill-rounds N] [--split-image-rounds N]

Workload: one 378x378 image + 40 text tokens per row, greedy, `--new-tokens` new tokens (eos disabled so
every run decodes the same number of steps). Each generate() call is timed token by token through its
`streamer`: prefill = start to the first new token, decode tokens/s = rows / median time between later
tokens. The roofline is the weight bytes streamed per decode step (text decoder + lm_head) divided by this
machine's measured streaming bandwidth: at batch 1, decoding cannot go faster than that.
Both models are loaded from the same random checkpoint in this process; outputs are checked equal.
`--split-image-rounds N` also times the prefill of one 1000x800 image through the processor with image splitting
(the published processor's default: four crops and the whole image, padded to a common size), N paired rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from bench_common import streaming_bandwidth


def make_inputs(config: dict, batch: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    image_id, n_latents = config["image_token_id"], config["perceiver_config"]["resampler_n_latents"]
    rows = [[1, image_id - 1] + [image_id] * n_latents + [image_id - 1]
            + torch.randint(3, 30000, (40,), generator=g).tolist() for _ in range(batch)]
    return dict(
        input_ids=torch.tensor(rows),
        attention_mask=torch.ones(batch, len(rows[0]), dtype=torch.long),
        pixel_values=(torch.rand(batch, 1, 3, 378, 378, generator=g) * 2 - 1).to(dtype),
        pixel_attention_mask=torch.ones(batch, 1, 378, 378, dtype=torch.long),
    )


class StepClock:
    """A streamer that only timestamps: generate() calls put() with the prompt, then once per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(models: dict, inputs: dict, new_tokens: int, repeats: int, **gen) -> dict:
    """{name: (prefill s, decode s per step, output)}: prefill = start of generate() to its first new token
    (image encoding included), decode = the median time between later tokens. Timing the steps themselves keeps
    the decode figure free of prefill noise (a long bf16 prefill would otherwise swamp it); the models take
    turns, round after round, the one going first alternating, so a slow spell of this machine hits both alike.
    Medians over the rounds."""
    prefills = {name: [] for name in models}
    steps = {name: [] for name in models}
    outputs = {}
    order = list(models.items())
    for i in range(repeats + 1):  # the first round warms up
        for name, model in order if i % 2 else order[::-1]:  # who goes first alternates
            clock = StepClock()
            start = time.perf_counter()
            with torch.inference_mode():
                outputs[name] = model.generate(**inputs, max_new_tokens=new_tokens, streamer=clock, **gen)
            if i:
                prefills[name].append(clock.times[1] - start)
                steps[name].extend(b - a for a, b in zip(clock.times[1:], clock.times[2:]))
    return {name: (statistics.median(prefills[name]), statistics.median(steps[name]), outputs[name])
            for name in models}


def paired_prefill(ours, ref, inputs: dict, rounds: int, gen: dict) -> str:
    """Prefill alone (one new token), round after round, the library going first alternating: medians and the
    rounds each was faster in (this machine drifts by 10% within minutes; pairs see the same drift)."""
    times = {"ours": [], "transformers": []}
    with torch.inference_mode():
        for i in range(rounds + 1):  # the first round warms up
            order = [("ours", ours), ("transformers", ref)]
            for name, model in order if i % 2 else order[::-1]:
                start = time.perf_counter()
                model.generate(**inputs, **{**gen, "max_new_tokens": 1})
                if i:
                    times[name].append(time.perf_counter() - start)
    ours_ms, ref_ms = (1e3 * statistics.median(times[n]) for n in ("ours", "transformers"))
    wins = sum(a < b for a, b in zip(times["ours"], times["transformers"]))
    return (f"prefill alone, {rounds} paired rounds: {ref_ms:.0f} vs {ours_ms:.0f} ms ({ref_ms / ours_ms:.2f}x), "
            f"ours faster in {wins} of {rounds}")


def split_image_prefill(ours, ref, path: str, rounds: int, gen: dict) -> str:
    """Prefill of one 1000x800 image split into 4 crops + the whole one (padded to a common size in the batch)."""
    import numpy as np
    from PIL import Image

    from idefics2 import Idefics2Processor

    processor = Idefics2Processor.from_pretrained(path)
    processor.image_processor.do_image_splitting = True
    image = Image.fromarray((np.random.default_rng(0).random((1000, 800, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the total?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(processor(text=text, images=[image], return_tensors="pt"))
    inputs["pixel_values"] = inputs["pixel_values"].to(ours.dtype)
    return "split 1000x800 image, " + paired_prefill(ours, ref, inputs, rounds, gen)


def decode_weight_bytes(model) -> int:
    text = model.model.text_model
    layers = sum(p.numel() * p.element_size() for p in text.layers.parameters())
    return layers + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--checkpoint")
    parser.add_argument("--prefill-rounds", type=int, default=0,
                        help="also time prefill alone (generate with one new token) over this many paired rounds, "
                             "the libraries alternating which goes first, and count the rounds each wins")
    parser.add_argument("--split-image-rounds", type=int, default=0,
                        help="also time the prefill of one 1000x800 image with image splitting (4 crops + the "
                             "whole image) over this many paired rounds, per dtype")
    args = parser.parse_args()

    import json

    from transformers import Idefics2ForConditionalGeneration as RefModel

    from idefics2 import Idefics2ForConditionalGeneration
    from idefics2.presets import write_random_checkpoint

    bandwidth = streaming_bandwidth()
    print(f"threads: {torch.get_num_threads()}, measured streaming bandwidth: {bandwidth / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or write_random_checkpoint(args.preset, os.path.join(tmp, "ckpt"))
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, bad_words_ids=[[32000], [32001]])
        header = f"{'dtype':9}{'batch':>6}{'':>3}{'prefill ms':>12}{'decode tok/s':>14}{'roofline':>10}"
        print(header)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            ours = Idefics2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
            ref = RefModel.from_pretrained(path, dtype=dtype).eval()
            roofline_tps = bandwidth / decode_weight_bytes(ours)
            for batch in (int(b) for b in args.batches.split(",")):
                inputs = make_inputs(config, batch, dtype)
                results = {}
                timings = timed_generate({"transformers": ref, "idefics2": ours}, inputs, args.new_tokens,
                                         args.repeats, **gen)
                for name, (prefill, step, out) in timings.items():
                    tps = batch / step
                    results[name] = (prefill, tps, out)
                    print(f"{dtype_name:9}{batch:>6}   {name:13}{prefill * 1e3:>8.0f}{tps:>14.1f}"
                          f"{tps / batch / roofline_tps:>10.2f}")
                (p_ref, t_ref, o_ref), (p_ours, t_ours, o_ours) = results["transformers"], results["idefics2"]
                same = "identical" if torch.equal(o_ref, o_ours) else "DIFFERENT"
                print(f"{'':18}ratio: prefill {p_ref / p_ours:.2f}x, decode {t_ours / t_ref:.2f}x; outputs {same}")
                if args.prefill_rounds:
                    print(f"{'':18}{paired_prefill(ours, ref, inputs, args.prefill_rounds, gen)}")
            if args.split_image_rounds:
                print(f"{dtype_name:9}{1:>6}   {split_image_prefill(ours, ref, path, args.split_image_rounds, gen)}")
            del ours, ref


if __name__ == "__main__":
    main()
