"""Weight-streaming throughput of F.linear vs idefics2.kernels.small_batch_linear at decode batch sizes.

    python benchmarks/small_gemm.py [--models medium,8b] [--dtypes float32,bfloat16] [--batches 1,2,4,8,16]

At small batch a linear layer is bound by reading its weight from memory, so the figure of merit is GB/s of
weight bytes streamed (weight.numel() * element size / time). The reference is x.sum() over 256 MiB (the
rate this machine can stream memory). Every shape cycles through enough distinct weight copies that their
total exceeds the CPU caches, so each call reads its weight from DRAM. Both implementations are timed in
the same run, interleaved, best of --repeats; ratios are ours / F.linear. bf16 rows use bf16 activations;
"mixed" is fp32 activations with bf16 weights (F.linear cannot do it, so its column is F.linear on the
fp32 copy of the weight, i.e. twice the bytes).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from bench_common import streaming_bandwidth

from idefics2.kernels import kernel_status, small_batch_linear

SHAPES = {  # [out, in] of the text decoder's matmuls
    "medium": {"qkv": (1536, 1024), "o": (1024, 1024), "gate_up": (7168, 1024), "down": (1024, 3584),
               "lm_head": (32003, 1024)},
    "8b": {"qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
POOL_BYTES = 640 * 2**20  # more than the 260 MiB L3 of this machine: every call streams from DRAM


def time_pool(fn, xs, ws, repeats: int) -> float:
    """Best seconds per call over `repeats` passes through all weight copies."""
    fn(xs[0], ws[0])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for x, w in zip(xs, ws):
            fn(x, w)
        best = min(best, (time.perf_counter() - t) / len(ws))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="medium,8b")
    p.add_argument("--dtypes", default="float32,bfloat16,mixed")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)

    ref = streaming_bandwidth(7)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel: {kernel_status()}")
    print(f"streaming reference x.sum() over 256 MiB: {ref / 1e9:.1f} GB/s\n")
    print(f"{'dtype':8} {'shape':16} {'B':>3} {'F.linear':>9} {'ours':>9} {'ratio':>6} {'ours/ref':>8}  (GB/s)")
    totals: dict[tuple[str, int], list[float]] = {}
    for dtype_name in args.dtypes.split(","):
        wdtype = torch.float32 if dtype_name == "float32" else torch.bfloat16
        xdtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
        for model in args.models.split(","):
            for name, (n, k) in SHAPES[model].items():
                elem = torch.finfo(wdtype).bits // 8
                copies = max(2, -(-POOL_BYTES // (n * k * elem)))
                ws = [torch.randn(n, k).to(wdtype) for _ in range(copies)]
                ws_ref = [w.float() for w in ws] if dtype_name == "mixed" else ws
                wbytes = n * k * elem
                for b in batches:
                    xs = [torch.randn(b, k).to(xdtype) for _ in range(copies)]
                    with torch.inference_mode():
                        t_ref = time_pool(F.linear, xs, ws_ref, args.repeats)
                        t_our = time_pool(small_batch_linear, xs, ws, args.repeats)
                    g_ref, g_our = wbytes / t_ref / 1e9, wbytes / t_our / 1e9
                    tot = totals.setdefault((dtype_name, b), [0.0, 0.0, 0.0])
                    tot[0] += wbytes
                    tot[1] += t_ref
                    tot[2] += t_our
                    print(f"{dtype_name:8} {model + ' ' + name:16} {b:>3} {g_ref:9.1f} {g_our:9.1f} "
                          f"{g_our / g_ref:6.2f} {g_our * 1e9 / ref:8.2f}", flush=True)
                del ws, ws_ref
    print("\nsummary (all shapes together: total weight bytes / total time)")
    print(f"{'dtype':8} {'B':>3} {'F.linear':>9} {'ours':>9} {'ratio':>6}")
    for (dtype_name, b), (nbytes, t_ref, t_our) in totals.items():
        print(f"{dtype_name:8} {b:>3} {nbytes / t_ref / 1e9:9.1f} {nbytes / t_our / 1e9:9.1f} {t_ref / t_our:6.2f}")


if __name__ == "__main__":
    main()
