"""Run the README's fine-tuning recipes for a few optimizer steps and report their peak memory.

    python benchmarks/finetune_recipes.py [--preset 8b-shapes] [--recipes qlora,lora] [--steps 2] [--device cuda]

Builds a random-weight checkpoint of the preset (bf16, in the published layout; built on the GPU when there is
one), writes a small synthetic chat dataset (document-sized, photo-sized and square images with a question and
an answer), and runs `idefics2 finetune` with each recipe's flags exactly as the README gives them, in its own
process. Prints, per recipe: peak GPU memory (allocated by torch, and reserved: what nvidia-smi shows) or peak
RSS on the CPU, samples/s, and the first and last loss. `--preset tiny --device cpu` is a quick dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# The README's recipes ("Fine-tuning the 8B model"), flags verbatim.
RECIPES = {
    "qlora": ["--method", "qlora", "--gradient-checkpointing", "--no-image-splitting", "--batch-size", "2",
              "--gradient-accumulation-steps", "8"],
    "lora": ["--method", "lora", "--gradient-checkpointing", "--batch-size", "4", "--gradient-accumulation-steps", "4"],
}
BUDGET_GIB = {"qlora": 24, "lora": 80}  # the GPU each recipe is documented for


def write_dataset(directory: str, samples: int) -> str:
    from PIL import Image

    sizes = [(980, 1386), (1024, 768), (378, 378)]  # an A4 page, a photo, a small square
    question = ("Read the document in the image and list every heading, the totals in each table and the date "
                "printed at the bottom, then say which section is the longest.")
    answer = ("The headings are Summary, Revenue by region and Outlook. The revenue table totals 4,812 and the "
              "costs table totals 3,977. The date at the bottom is 12 March 2024. Revenue by region is the "
              "longest section.")
    path = os.path.join(directory, "train.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(samples):
            w, h = sizes[i % len(sizes)]
            name = f"image_{i}.png"
            Image.effect_noise((w, h), 40 + i).convert("RGB").save(os.path.join(directory, name))
            handle.write(json.dumps({
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": [name],
            }) + "\n")
    return path


def build_checkpoint(preset: str, directory: str, device: str) -> str:
    import torch

    from idefics2.cli import copy_processor_files
    from idefics2.presets import write_random_checkpoint

    t = time.perf_counter()
    write_random_checkpoint(preset, directory, dtype=torch.bfloat16, device=device)
    copy_processor_files(directory)
    print(f"checkpoint {preset} (bf16) written in {time.perf_counter() - t:.0f} s", flush=True)
    return directory


def run_recipe(name: str, checkpoint: str, data: str, output: str, steps: int, device: str) -> dict:
    command = [sys.executable, "-m", "idefics2", "finetune", "--model", checkpoint, "--train", data,
               "--output", output, "--max-steps", str(steps), "--no-progress", "--device", device, *RECIPES[name]]
    t = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    with open(os.path.join(output, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if '"loss"' in line]
    last = records[-1]
    return {"wall_s": elapsed, "losses": [r["loss"] for r in records],
            "samples_per_s": last["samples_per_s"],
            **{k: v for k, v in last.items() if k.startswith("peak_")},
            "setup": next((line for line in proc.stderr.splitlines() if line.startswith("idefics2 finetune:")), "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8b-shapes", help="random checkpoint architecture (default 8b-shapes)")
    parser.add_argument("--checkpoint", help="use this checkpoint directory instead of building one")
    parser.add_argument("--recipes", default="qlora,lora", help=f"comma-separated, of {sorted(RECIPES)}")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per recipe (default 2)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workdir", help="where to put the checkpoint and data (default: a temporary directory)")
    args = parser.parse_args()

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for r in recipes:
        if r not in RECIPES:
            raise SystemExit(f"unknown recipe {r!r}; choose from {sorted(RECIPES)}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        checkpoint = args.checkpoint or build_checkpoint(args.preset, os.path.join(tmp, "ckpt"), device)
        samples = 16 * args.steps  # both recipes take 16 samples per optimizer step
        data = write_dataset(tmp, samples)
        if device == "cuda":
            print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
        for name in recipes:
            result = run_recipe(name, checkpoint, data, os.path.join(tmp, f"out-{name}"), args.steps, device)
            print(f"\n[{name}] {' '.join(RECIPES[name])}")
            if "error" in result:
                print(f"  failed: {result['error']}")
                continue
            print(f"  {result['setup']}")
            if "peak_gpu_allocated_mib" in result:
                alloc, reserved = result["peak_gpu_allocated_mib"] / 1024, result["peak_gpu_reserved_mib"] / 1024
                print(f"  peak GPU memory: {alloc:.1f} GiB allocated, {reserved:.1f} GiB reserved "
                      f"(documented for a {BUDGET_GIB[name]} GB GPU)")
            elif "peak_rss_mib" in result:
                print(f"  peak RSS: {result['peak_rss_mib'] / 1024:.2f} GiB")
            losses = ", ".join(f"{v:.4f}" for v in result["losses"])
            print(f"  {args.steps} steps of 16 samples in {result['wall_s']:.0f} s (incl. load), "
                  f"last step {result['samples_per_s']:.2f} samples/s, losses {losses}")


if __name__ == "__main__":
    main()
