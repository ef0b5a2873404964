"""Quantized decoding on the CPU: speed, memory, load time and accuracy, ours vs transformers, in one run.

    python benchmarks/quantization.py [--preset medium] [--batches 1,8] [--steps 16] [--rounds 5]

On one random `--preset` checkpoint: decode time per step (KV cache of a 100-token prompt) at each batch size for
our bf16, int8, int4 and bitsandbytes nf4, and transformers' bf16 and bnb nf4, all loaded in one process and timed
in interleaved rounds (this machine's speed drifts by tens of percent over minutes); peak RSS of each load (each in
its own subprocess, above the interpreter's baseline; loading from a float32 checkpoint reads it all, so the
quantized checkpoints' own loads show the quantized footprint); load time of an int8 / int4 checkpoint written by
`idefics2 quantize`; and accuracy against our bf16 model on random prompts: relative logit error and greedy top-1
agreement, overall and on the positions whose bf16 top-1/top-2 margin is in the upper half (a random model's
logits are nearly flat, so low-margin positions flip even between bf16 and fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

LOAD = r"""
import torch
def load(which, path):
    # one variant: ours (bf16, int8, int4, nf4, or a checkpoint as stored) or transformers' (bf16, nf4)
    skip = ["model.vision_model", "model.connector", "lm_head"]
    if which.startswith("transformers"):
        import transformers as T
        kwargs = {"dtype": torch.bfloat16, "device_map": "cpu"}
        if which.endswith("nf4"):
            kwargs["quantization_config"] = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
        return T.Idefics2ForConditionalGeneration.from_pretrained(path, **kwargs).eval()
    import idefics2 as I
    kwargs = {"dtype": torch.bfloat16}
    if which in ("int8", "int4"):
        kwargs["quantize"] = which
    elif which == "nf4":
        kwargs["quantization_config"] = I.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_compute_dtype=torch.bfloat16)
    return I.Idefics2ForConditionalGeneration.from_pretrained(path, **kwargs).eval()
"""

CHILD = LOAD + r"""
import json, sys, time, torch
which, path, batches, steps = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split(",")], int(sys.argv[4])
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
import idefics2, transformers  # noqa: F401  (imported before the baseline: the peak counts the model only)
base = status_kib("VmRSS")
t = time.perf_counter()
model = load(which, path)
load_s = time.perf_counter() - t
results = {"load_s": load_s}
with torch.inference_mode():
    for b in batches:
        out = model(input_ids=torch.randint(3, 30000, (b, 100)), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "past_key_values", None) or out.cache
        tok = torch.randint(3, 30000, (b, 1))
        mask = torch.ones(b, 100 + steps + 2, dtype=torch.long)
        length = 100
        times = []
        for i in range(steps + 2):
            length += 1
            t = time.perf_counter()
            out = model(input_ids=tok, attention_mask=mask[:, :length], past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            cache = getattr(out, "past_key_values", None) or out.cache
        results[f"step_ms_b{b}"] = 1e3 * sorted(times[2:])[len(times[2:]) // 2]
results["rss_mib"] = (status_kib("VmHWM") - base) / 1024
layers = model.model.text_model.layers
results["text_layer_mib"] = sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()]) / 2**20
print(json.dumps(results))
"""


SPEED_CHILD = LOAD + r"""
import json, statistics, sys, time, torch
path, names, batches, steps, rounds = sys.argv[1], sys.argv[2].split(","), [int(b) for b in sys.argv[3].split(",")], int(sys.argv[4]), int(sys.argv[5])
models = {name: load(name, path) for name in names}
def decode_ms(model, b):
    out = model(input_ids=torch.randint(3, 30000, (b, 100)), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "past_key_values", None) or out.cache
    tok = torch.randint(3, 30000, (b, 1))
    mask = torch.ones(b, 100 + steps + 2, dtype=torch.long)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        out = model(input_ids=tok, attention_mask=mask[:, :101 + i], past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t)
        cache = getattr(out, "past_key_values", None) or out.cache
    return 1e3 * statistics.median(times[2:])
samples = {f"{n}|{b}": [] for n in names for b in batches}
with torch.inference_mode():
    for _ in range(rounds):  # interleaved, so that a slow spell of the machine hits every variant alike
        for b in batches:
            for name, model in models.items():
                samples[f"{name}|{b}"].append(decode_ms(model, b))
print(json.dumps({k: statistics.median(v) for k, v in samples.items()}))
"""


def speeds(path: str, names: list[str], batches: str, steps: int, rounds: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", SPEED_CHILD, path, ",".join(names), batches, str(steps), str(rounds)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"speed run failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(which: str, path: str, batches: str, steps: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, which, path, batches, str(steps)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def accuracy(path: str, n_prompts: int = 8, length: int = 64) -> list[tuple[str, float, float, float, float]]:
    """Per method: relative logit error vs our bf16, top-1 agreement (all / upper-half-margin positions), and
    the relative difference between its decoding path (the kernels, token by token from the KV cache: int4
    rounds activations to int8 per group) and its prefill path on the same positions."""
    import torch

    from idefics2 import Idefics2ForConditionalGeneration

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 30000, (n_prompts, length), generator=g)
    half = length // 2
    with torch.inference_mode():
        ref = Idefics2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)(input_ids=ids).logits.float()
        top2 = ref.topk(2, dim=-1).values
        margin = (top2[..., 0] - top2[..., 1]).flatten()
        confident = margin >= margin.median()
        rows = []
        for method in ("int8", "int4"):
            model = Idefics2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, quantize=method)
            logits = model(input_ids=ids).logits.float()
            rel = ((logits - ref).norm() / ref.norm()).item()
            agree = (logits.argmax(-1) == ref.argmax(-1)).flatten()
            out = model(input_ids=ids[:, :half], use_cache=True)
            stepped = [out.logits[:, -1:].float()]
            for t in range(half, length - 1):
                out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
                stepped.append(out.logits.float())
            prefilled = logits[:, half - 1:length - 1]  # the positions the steps predicted from
            decode_rel = ((torch.cat(stepped, dim=1) - prefilled).norm() / prefilled.norm()).item()
            rows.append((method, rel, agree.float().mean().item(), agree[confident].float().mean().item(), decode_rel))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--checkpoint")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    args = parser.parse_args()

    from idefics2.presets import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or write_random_checkpoint(args.preset, os.path.join(tmp, "ckpt"))
        batches = [int(b) for b in args.batches.split(",")]
        names = ["bf16", "int8", "int4", "nf4", "transformers-bf16", "transformers-nf4"]
        step_ms = speeds(path, names, args.batches, args.steps, args.rounds)
        results = {name: run(name, path, "1", 2) for name in names}  # load time and peak RSS, one process each
        header = "".join(f"{'step ms b' + str(b):>14}" for b in batches)
        print(f"decode step: median of {args.rounds} interleaved rounds of {args.steps} steps (100-token prefix)")
        print(f"{'':20}{header}{'peak RSS MiB':>14} (loading the float checkpoint)")
        for name in names:
            r = results[name]
            cells = "".join(f"{step_ms[f'{name}|{b}']:>14.1f}" for b in batches)
            speed = " ".join(f"{step_ms[f'bf16|{b}'] / step_ms[f'{name}|{b}']:.2f}x" for b in batches)
            rss = f"{r['rss_mib']:>14.0f}" if "error" not in r else f"  failed: {r['error']}"
            print(f"{name:20}{cells}{rss}   speed vs our bf16: {speed}")
        # Checkpoints as users load them: bf16 as saved in bf16, int8 / int4 as written by `idefics2 quantize`.
        # Peak RSS covers the load and a short decode; the text layers' share is the peak minus what the bf16
        # model holds outside its text layers.
        bf16_dir = os.path.join(tmp, "bf16")
        subprocess.run([sys.executable, "-c", "import sys, torch, idefics2; idefics2.Idefics2ForConditionalGeneration"
                        ".from_pretrained(sys.argv[1], dtype=torch.bfloat16).save_pretrained(sys.argv[2])", path,
                        bf16_dir], check=True, capture_output=True)
        stored = {"bf16": run("ours-prequantized", bf16_dir, "1", 2)}
        for method in ("int8", "int4"):
            out = os.path.join(tmp, method)
            subprocess.run([sys.executable, "-m", "idefics2", "quantize", "--model", path, "--method", method,
                            "--output", out], check=True, capture_output=True)
            stored[method] = run("ours-prequantized", out, "1", 2)
        if all("error" not in r for r in stored.values()):
            outside = stored["bf16"]["rss_mib"] - stored["bf16"]["text_layer_mib"]
            bf16_text = stored["bf16"]["text_layer_mib"]
            for method, r in stored.items():
                text_rss = r["rss_mib"] - outside
                print(f"{method} checkpoint: load {r['load_s']:.2f} s, peak RSS {r['rss_mib']:.0f} MiB "
                      f"({r['rss_mib'] / stored['bf16']['rss_mib']:.2f}x bf16); text layers {r['text_layer_mib']:.0f} "
                      f"MiB in tensors, ~{text_rss:.0f} MiB of the peak = {text_rss / bf16_text:.2f}x bf16's")
        else:
            print("stored checkpoints failed:", {k: r.get("error") for k, r in stored.items()})
        for method, rel, top1, top1_confident, decode_rel in accuracy(path):
            print(f"{method}: relative logit error {rel:.4f}, top-1 agreement {top1:.3f} "
                  f"({top1_confident:.3f} on the upper-half-margin positions); decoding path vs prefill path: "
                  f"{decode_rel:.4f} relative")


if __name__ == "__main__":
    main()
