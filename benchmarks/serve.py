"""Throughput and latency of `idefics2 serve` under concurrent clients, and the image-feature cache's gain.

    python benchmarks/serve.py [--preset medium] [--clients 1,4,8,16] [--requests 16] [--max-tokens 32,128]

Starts the server on a random `--preset` checkpoint (127.0.0.1, free port), then for each client count sends
`--requests` streaming chat requests (one distinct 378x378 image each, greedy, up to `--max-tokens` tokens)
from that many concurrent clients. Prints aggregate generated tokens/s, p50/p95 time to first token, and the
speed-up over the same requests sent one at a time, for each answer length in `--max-tokens`. Short answers
are bound by the prefills (image encoding + prompt, compute-bound, so batching them gains nothing on a CPU);
long answers by decoding, where batching pays. Then the same image in every request (feature cache hits)
against distinct images, sequentially, comparing time to first token.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
from PIL import Image


def image_uri(seed: int) -> str:
    image = Image.new("RGB", (378, 378), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    image.putpixel((0, 0), (seed & 255, (seed >> 8) & 255, (seed >> 16) & 255))  # a distinct image per seed
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(base: str, uri: str, max_tokens: int) -> tuple[float, int, float]:
    """(time to first token, generated tokens, total time) of one streaming request."""
    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": "Describe this image in detail."}]}]}
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first or (time.perf_counter() - start), tokens, time.perf_counter() - start


def run_level(base: str, clients: int, uris: list[str], max_tokens: int) -> dict:
    results: list[tuple[float, int, float]] = []
    lock = threading.Lock()
    work = list(uris)

    def client() -> None:
        while True:
            with lock:
                if not work:
                    return
                uri = work.pop()
            outcome = one_request(base, uri, max_tokens)
            with lock:
                results.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"tokens_per_s": sum(r[1] for r in results) / elapsed, "elapsed": elapsed,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--checkpoint", help="use this checkpoint directory (with processor files)")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", default="32,128", help="answer lengths, one table each")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if not path:
            path = os.path.join(tmp, "ckpt")
            subprocess.run([sys.executable, "-m", "idefics2", "init-random", "--preset", args.preset, path],
                           check=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "idefics2", "serve", "--model", path, "--port", str(port), "--no-image-splitting",
             "--served-model-name", "bench", "--max-batch-size", "16", "--max-queue", "256"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            # The model must not stop early, so that every level decodes the same number of tokens.
            one_request(base, image_uri(10_000), 2)  # warm-up
            for max_tokens in (int(t) for t in args.max_tokens.split(",")):
                print(f"{args.requests} requests x {max_tokens} tokens, one 378x378 image each, {args.preset}")
                print(f"{'clients':>8}{'tok/s':>10}{'speed-up':>10}{'ttft p50 s':>12}{'ttft p95 s':>12}")
                sequential = None
                for level in (int(c) for c in args.clients.split(",")):
                    # Distinct images per level and length, so no run profits from another's feature cache.
                    level_uris = [image_uri(i + 1000 * level + 100_000 * max_tokens) for i in range(args.requests)]
                    stats = run_level(base, level, level_uris, max_tokens)
                    if level == 1:
                        sequential = stats["tokens_per_s"]
                    ratio = stats["tokens_per_s"] / sequential if sequential else float("nan")
                    print(f"{level:>8}{stats['tokens_per_s']:>10.1f}{ratio:>9.2f}x{stats['ttft_p50']:>12.2f}"
                          f"{stats['ttft_p95']:>12.2f}")
            fresh = [one_request(base, image_uri(50_000 + i), 1)[0] for i in range(4)]
            same = image_uri(60_000)
            one_request(base, same, 1)
            cached = [one_request(base, same, 1)[0] for _ in range(4)]
            print(f"feature cache: time to first token {statistics.median(fresh):.3f} s with a new image, "
                  f"{statistics.median(cached):.3f} s with a repeated one "
                  f"({statistics.median(fresh) / statistics.median(cached):.1f}x)")
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
