"""Load time, peak RSS during load and prefill latency: idefics2 vs transformers, measured in one run.

    python benchmarks/load_and_forward.py [--preset medium] [--repeats 5] [--threads N]

Each loader runs in a fresh subprocess (so peak RSS is its own), one after the other, on the same random
checkpoint (~420M parameters, the 8b's shape ratios). Prefill = one 378x378 image + 40 text tokens.
RSS figures are above the interpreter's baseline (torch and the library imported). Our loader maps the
files and reads pages only when they are used, so "after prefill" shows the weights actually resident.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, statistics, sys, time
import torch
which, path, repeats, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
if which == "ours":
    from idefics2 import Idefics2ForConditionalGeneration as Model
else:
    from transformers import Idefics2ForConditionalGeneration as Model
import safetensors.torch  # noqa: F401  (both sides import it; keep it out of the load figure)
def status_kib(field):  # VmHWM is this process's own peak (ru_maxrss would include the parent's, kept over exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
baseline = status_kib("VmRSS")
start = time.perf_counter()
model = Model.from_pretrained(path).eval()
load_s = time.perf_counter() - start
peak_load = status_kib("VmHWM")
cfg = json.load(open(f"{path}/config.json"))
image_id, n_latents = cfg["image_token_id"], cfg["perceiver_config"]["resampler_n_latents"]
g = torch.Generator().manual_seed(0)
ids = [1, image_id - 1] + [image_id] * n_latents + [image_id - 1] + torch.randint(3, 30000, (40,), generator=g).tolist()
inputs = dict(input_ids=torch.tensor([ids]), pixel_values=torch.rand(1, 1, 3, 378, 378, generator=g) * 2 - 1,
              pixel_attention_mask=torch.ones(1, 1, 378, 378, dtype=torch.long), logits_to_keep=1)
times = []
with torch.inference_mode():
    model(**inputs)  # warm-up
    for _ in range(repeats):
        t = time.perf_counter(); out = model(**inputs); times.append(time.perf_counter() - t)
print(json.dumps({"load_s": load_s, "load_rss_mib": (peak_load - baseline) / 1024,
                  "forward_rss_mib": (status_kib("VmHWM") - baseline) / 1024,
                  "prefill_s": statistics.median(times), "logits": out.logits[0, -1, :8].tolist()}))
"""


def run(which: str, path: str, repeats: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, which, path, str(repeats), str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--checkpoint", help="use this checkpoint directory instead of a fresh random one")
    args = parser.parse_args()

    from idefics2.presets import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or write_random_checkpoint(args.preset, os.path.join(tmp, "ckpt"))
        size_mib = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                       if f.endswith(".safetensors")) / 2**20
        results = {}
        for which in ("transformers", "ours"):  # reference first: any page-cache warm-up favours it
            results[which] = run(which, path, args.repeats, args.threads)
    ours, ref = results["ours"], results["transformers"]
    print(f"checkpoint: {args.checkpoint or args.preset}, {size_mib:.0f} MiB of safetensors, "
          f"{args.threads} threads, prefill = 378x378 image + 40 text tokens (median of {args.repeats})")
    print(f"{'':24}{'idefics2':>12}{'transformers':>14}{'ratio':>10}")
    print(f"{'load time (s)':24}{ours['load_s']:>12.2f}{ref['load_s']:>14.2f}{ref['load_s'] / ours['load_s']:>9.2f}x")
    print(f"{'load peak RSS (MiB)':24}{ours['load_rss_mib']:>12.0f}{ref['load_rss_mib']:>14.0f}"
          f"{ours['load_rss_mib'] / ref['load_rss_mib']:>9.2f}x")
    print(f"{'  / checkpoint size':24}{ours['load_rss_mib'] / size_mib:>12.2f}{ref['load_rss_mib'] / size_mib:>14.2f}")
    print(f"{'peak RSS after prefill':24}{ours['forward_rss_mib']:>12.0f}{ref['forward_rss_mib']:>14.0f}"
          f"{ours['forward_rss_mib'] / ref['forward_rss_mib']:>9.2f}x")
    print(f"{'prefill (ms)':24}{ours['prefill_s'] * 1e3:>12.1f}{ref['prefill_s'] * 1e3:>14.1f}"
          f"{ref['prefill_s'] / ours['prefill_s']:>9.2f}x")
    diff = max(abs(a - b) for a, b in zip(ours["logits"], ref["logits"]))
    print(f"max |logit diff| on the last position (first 8): {diff:.2e}")


if __name__ == "__main__":
    main()
