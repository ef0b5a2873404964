"""LoRA training throughput and peak RSS: idefics2 vs transformers + peft, measured in one run.

    python benchmarks/finetune.py [--preset medium] [--steps 3] [--rounds 4] [--threads N] [--gradient-checkpointing]
                                  [--no-memory-pool]

Same random checkpoint (~420M parameters, the 8b's shape ratios), same batch (2 samples, one 378x378 image each,
no image splitting, a short user/assistant exchange, labels on the answer only), same LoRA recipe (r=8, alpha=8,
dropout 0.1 on the text decoder, modality projection and perceiver projections), AdamW, float32 on CPU. Each side runs
in a fresh subprocess so its peak RSS is its own (above the interpreter baseline with torch, peft and the library
imported); the sides take turns, `--rounds` processes each. samples/s is the median over all rounds' timed steps
(each after one warm-up step), the peak RSS the highest of the rounds. Ours is idefics2's training setup:
`apply_lora` (peft's LoRA with each adapter's dropout fused into its lora_A), the trainer's
`logits_to_keep=target_positions(labels)`, and the trainer's CPU memory pool (`kernels.cpu_memory_pool`, which
`idefics2 finetune --no-memory-pool` turns off).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, statistics, sys, time
import torch
which, path, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
checkpointing, pool = sys.argv[5] == "1", sys.argv[6] == "1"
torch.set_num_threads(threads)
import peft
from idefics2 import Idefics2Processor
from idefics2.training import DEFAULT_LORA_TARGET, ChatCollator, Sample, apply_lora, target_positions
if which == "ours":
    from idefics2 import Idefics2ForConditionalGeneration as Model
else:
    from transformers import Idefics2ForConditionalGeneration as Model
from PIL import Image
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
processor = Idefics2Processor.from_pretrained(path, do_image_splitting=False)
images = {c: Image.new("RGB", (378, 378), c) for c in ("red", "blue")}
samples = [Sample([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]},
                   {"role": "assistant", "content": [{"type": "text", "text": f"A plain {c} square filling the whole frame, "
                                                      "with no other objects, text or texture anywhere."}]}], [c], i)
           for i, c in enumerate(images)]
batch = ChatCollator(processor, image_loader=images.__getitem__)(samples)
baseline = status_kib("VmRSS")
model = Model.from_pretrained(path)
if checkpointing:
    if which == "ours":
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
torch.manual_seed(0)
if which == "ours":  # our training setup: peft's LoRA with each adapter's dropout fused into its lora_A
    model = apply_lora(model, r=8, alpha=8, dropout=0.1, target=DEFAULT_LORA_TARGET)
else:
    for p in model.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1,
                                                       target_modules=DEFAULT_LORA_TARGET, init_lora_weights="gaussian"))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
times, losses = [], []
import contextlib
from idefics2 import kernels
# ours: the trainer's CPU memory pool around the steps
with kernels.cpu_memory_pool() if which == "ours" and pool else contextlib.nullcontext():
    for step in range(steps + 1):
        t = time.perf_counter()
        # ours: the trainer's call (logits only where a target is; the same loss)
        extra = {"logits_to_keep": target_positions(batch["labels"])} if which == "ours" else {}
        loss = model(**batch, **extra).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
print(json.dumps({"step_s": times, "peak_rss_mib": (status_kib("VmHWM") - baseline) / 1024,
                  "trainable": sum(p.numel() for p in params), "tokens": int(batch["input_ids"].numel()),
                  "first_loss": losses[0]}))
"""


def run(which: str, path: str, steps: int, threads: int, checkpointing: bool, pool: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, which, path, str(steps), str(threads),
                           "1" if checkpointing else "0", "1" if pool else "0"], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_rounds(results: list[dict]) -> dict:
    merged = dict(results[0])
    merged["samples_per_s"] = 2 / statistics.median(t for r in results for t in r["step_s"])
    merged["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium", help="random checkpoint architecture (default medium)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up (default 3)")
    parser.add_argument("--rounds", type=int, default=4, help="subprocesses per side, taking turns (default 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="enable it on both sides")
    parser.add_argument("--no-memory-pool", action="store_true",
                        help="ours without the trainer's CPU memory pool (glibc's allocator, as transformers uses)")
    parser.add_argument("--checkpoint", help="use this checkpoint directory instead of a fresh random one")
    args = parser.parse_args()

    from idefics2.cli import copy_processor_files
    from idefics2.presets import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            path = write_random_checkpoint(args.preset, os.path.join(tmp, "ckpt"))
            copy_processor_files(path)
        # The sides take turns (transformers, ours, transformers, ...): this machine's speed drifts by 10-15%
        # between minutes, so each side's figure is the median over its rounds' steps, and the peak RSS the
        # highest of its rounds.
        rounds: dict[str, list[dict]] = {"transformers": [], "ours": []}
        for _ in range(args.rounds):
            for which in rounds:
                rounds[which].append(run(which, path, args.steps, args.threads, args.gradient_checkpointing,
                                         not args.no_memory_pool))
    ours, ref = (merge_rounds(rounds[which]) for which in ("ours", "transformers"))
    print(f"checkpoint: {args.checkpoint or args.preset}, LoRA r=8 ({ours['trainable']:,} trainable parameters), "
          f"batch 2 x one 378x378 image ({ours['tokens'] // 2} tokens/sample), {args.threads} threads, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"memory pool {'off' if args.no_memory_pool else 'on'} (ours), median of {args.rounds} x {args.steps} "
          "steps")
    print(f"{'':24}{'idefics2':>12}{'transformers':>14}{'ratio':>10}")
    print(f"{'samples/s':24}{ours['samples_per_s']:>12.3f}{ref['samples_per_s']:>14.3f}"
          f"{ours['samples_per_s'] / ref['samples_per_s']:>9.2f}x")
    print(f"{'peak RSS (MiB)':24}{ours['peak_rss_mib']:>12.0f}{ref['peak_rss_mib']:>14.0f}"
          f"{ours['peak_rss_mib'] / ref['peak_rss_mib']:>9.2f}x")
    for which in ("ours", "transformers"):
        per_round = ", ".join(f"{2 / statistics.median(r['step_s']):.3f}" for r in rounds[which])
        print(f"  {which} samples/s by round: {per_round}")
    print(f"first-step loss: {ours['first_loss']:.6f} (ours) vs {ref['first_loss']:.6f} (transformers)")


if __name__ == "__main__":
    main()
