"""The `idefics2` command: generate, chat, batch, init-random, demo."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

PRESET_NAMES = ("tiny", "medium", "8b-shapes")


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


# ---- loading ---------------------------------------------------------------------------------------------------
def load_model_and_processor(model_dir: str, dtype: str = "auto", threads: int | None = None,
                             image_splitting: bool | None = None, quantize: str | None = None):
    import torch

    from .modeling import Idefics2ForConditionalGeneration
    from .processing import Idefics2Processor

    if threads:
        torch.set_num_threads(threads)
    if not os.path.isdir(model_dir):
        raise UserError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"{model_dir!r} has no config.json: not an Idefics2 checkpoint directory")
    model = Idefics2ForConditionalGeneration.from_pretrained(
        model_dir, dtype=None if dtype == "auto" else dtype, quantize=quantize
    )
    processor = Idefics2Processor.from_pretrained(model_dir)
    if image_splitting is not None:
        processor.image_processor.do_image_splitting = image_splitting
    if model.device.type == "cpu":
        # The decode kernels compile on first use (once per machine, then cached): do it here, not inside the
        # first request's timing.
        from . import kernels

        start = time.perf_counter()
        kernels.kernel_available()
        if time.perf_counter() - start > 2:
            print(f"built idefics2's CPU kernels in {time.perf_counter() - start:.0f} s ({kernels.kernel_status()}; "
                  "cached for later runs)", file=sys.stderr)
    return model, processor


def load_from_args(args: argparse.Namespace, model_dir: str | None = None):
    """The model and processor that the common model options (add_model_options) describe."""
    return load_model_and_processor(model_dir or args.model, args.dtype, args.threads,
                                    False if args.no_image_splitting else None, args.quantize)


def open_image(path: str):
    from .media import ImageLoadError
    from .media import open_image as load

    if not os.path.isfile(path):
        raise UserError(f"image {path!r} does not exist")
    try:
        return load(path)
    except ImageLoadError as e:
        raise UserError(f"cannot read image {path!r}: {e}") from e


def user_message(prompt: str, n_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}


def read_json_schema(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"JSON schema file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"JSON schema file {path!r} is not valid JSON: {e}") from e


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if getattr(args, "json_schema", None):
        kwargs["json_schema"] = read_json_schema(args.json_schema)
    if args.temperature and args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        if args.seed is not None:
            kwargs["seed"] = args.seed
    return kwargs


class TimedStreamer:
    """Streams text to a callback and records when the prompt was in and each token came out."""

    def __init__(self, tokenizer, on_text) -> None:
        from .streaming import TextStreamer

        self.inner = TextStreamer(tokenizer, skip_prompt=True, on_text=on_text)
        self.start = time.perf_counter()
        self.token_times: list[float] = []

    def put(self, value) -> None:
        if self.inner.prompt_seen:
            self.token_times.append(time.perf_counter())
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()

    def report(self) -> str:
        if not self.token_times:
            return "no tokens generated"
        prefill = self.token_times[0] - self.start
        n = len(self.token_times)
        decode = self.token_times[-1] - self.token_times[0]
        rate = (n - 1) / decode if n > 1 and decode > 0 else float("nan")
        return f"prefill {prefill:.2f} s, {n} tokens, decode {rate:.1f} tokens/s"


def run_chat_turn(model, processor, messages: list[dict], images: list, gen: dict[str, Any], out=sys.stdout,
                  verbose: bool = False) -> str:
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    return stream_answer(model, processor, dict(inputs), gen, out, verbose)


def stream_answer(model, processor, inputs: dict[str, Any], gen: dict[str, Any], out=sys.stdout,
                  verbose: bool = False) -> str:
    """generate() on `inputs`, writing the answer to `out` as it comes; returns it."""
    pieces: list[str] = []

    def emit(piece: str) -> None:
        pieces.append(piece)
        out.write(piece)
        out.flush()

    streamer = TimedStreamer(processor.tokenizer, emit)
    model.generate(**inputs, streamer=streamer, tokenizer=processor.tokenizer, **gen)
    out.write("\n")
    out.flush()
    if verbose:
        print(streamer.report(), file=sys.stderr)
    return "".join(pieces).strip()


class ChatSession:
    """A multi-turn conversation in the chat template's format. Each image is encoded once, when the turn it is
    attached to runs, and its features serve every later turn: the history is prefilled again each turn, but the
    vision tower and connector (most of a prefill with images) are not run again for old images."""

    def __init__(self, model, processor) -> None:
        from .pipeline import ImageFeatures

        self.model, self.processor = model, processor
        self.encoder = ImageFeatures(model, processor)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.features: list = []  # per attached image: [crops, n_latents, hidden]
        self.pending: list = []

    def attach(self, image) -> None:
        """Attach an image to the next user message."""
        self.pending.append(image)

    def inputs(self, prompt: str) -> dict[str, Any]:
        """Append the user's message (with the pending images) and return generate()'s inputs for the answer."""
        import torch

        self.features.extend(self.encoder.encode(image) for image in self.pending)
        self.messages.append(user_message(prompt, len(self.pending)))
        self.pending = []
        text = self.processor.apply_chat_template(self.messages, add_generation_prompt=True)
        inputs = self.encoder.inputs(text, [])
        if self.features:
            inputs["image_hidden_states"] = torch.cat(self.features)
        return inputs

    def ask(self, prompt: str, gen: dict[str, Any], out=sys.stdout, verbose: bool = False) -> str:
        self.inputs_of_last_turn = self.inputs(prompt)
        answer = stream_answer(self.model, self.processor, self.inputs_of_last_turn, gen, out, verbose)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer


# ---- commands --------------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    images = [open_image(p) for p in args.image or []]
    model, processor = load_from_args(args)
    run_chat_turn(model, processor, [user_message(args.prompt, len(images))], images, generation_kwargs(args),
                  verbose=args.verbose)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, processor = load_from_args(args)
    session = ChatSession(model, processor)
    print("Chat with idefics2. /image PATH attaches an image to your next message, /reset, /exit.",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.attach(open_image(path))
                print(f"(image attached: {path})", file=sys.stderr)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; use /image PATH, /reset or /exit", file=sys.stderr)
            continue
        sys.stdout.write("assistant> ")
        session.ask(line, generation_kwargs(args), verbose=args.verbose)


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    return run_batch(args)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"the server needs FastAPI and uvicorn: pip install 'idefics2[serve]' ({e})") from e
    from .server import serve

    return serve(args)


def cmd_estimate_memory(args: argparse.Namespace) -> int:
    import torch

    from .config import Idefics2Config
    from .memory import estimate
    from .presets import preset_config

    if args.model:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise UserError(f"{args.model!r} has no config.json: not an Idefics2 checkpoint directory")
        config = Idefics2Config.from_pretrained(args.model)
    else:
        config = preset_config("8b-shapes" if args.preset == "8b" else args.preset)
    result = estimate(config, getattr(torch, args.dtype), args.quantize, args.image_splitting == "on",
                      images=args.images, batch=args.batch, max_new_tokens=args.max_new_tokens)
    print(f"{args.model or args.preset}, {args.dtype}{', ' + args.quantize if args.quantize else ''}, "
          f"batch {args.batch}, {result.prompt_tokens} prompt tokens + {args.max_new_tokens} new")
    print(result.table())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .modeling import Idefics2ForConditionalGeneration

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"{args.model!r} has no config.json: not an Idefics2 checkpoint directory")
    model = Idefics2ForConditionalGeneration.from_pretrained(
        args.model, quantize=args.method, quantize_group_size=args.group_size,
        quantize_lm_head=False if args.float_lm_head or args.lm_head == "float" else (args.lm_head or True),
        dtype=None if args.dtype == "auto" else args.dtype,
    )
    model.save_pretrained(args.output)
    for name in os.listdir(args.model):  # processor and tokenizer files travel with the weights
        is_processor_file = name.endswith((".json", ".jinja", ".model")) and not name.startswith(("config.", "model."))
        if is_processor_file and not os.path.exists(os.path.join(args.output, name)):
            shutil.copyfile(os.path.join(args.model, name), os.path.join(args.output, name))
    print(f"wrote {args.method} checkpoint to {args.output}", file=sys.stderr)
    return 0


def cmd_init_random(args: argparse.Namespace) -> int:
    import torch

    from .presets import preset_config, write_random_checkpoint

    if args.dry_run:
        from .modeling import Idefics2ForConditionalGeneration, empty_weights

        with empty_weights():
            model = Idefics2ForConditionalGeneration(preset_config(args.preset))
        n = model.num_parameters()
        print(f"preset {args.preset}: {n:,} parameters; "
              f"{n * 4 / 2**30:.1f} GiB in float32, {n * 2 / 2**30:.1f} GiB in bfloat16")
        return 0
    if not args.out:
        raise UserError("init-random needs an output directory (or --dry-run)")
    if os.path.exists(args.out) and os.listdir(args.out) and not args.force:
        raise UserError(f"{args.out!r} exists and is not empty (use --force to overwrite)")
    dtype = getattr(torch, args.dtype)
    write_random_checkpoint(args.preset, args.out, seed=args.seed, dtype=dtype)
    copy_processor_files(args.out)
    print(f"wrote a random {args.preset} checkpoint to {args.out}", file=sys.stderr)
    return 0


def copy_processor_files(directory: str) -> None:
    """The published idefics2-8b processor and tokenizer files (real Mistral vocabulary), from the package."""
    from importlib import resources

    source = resources.files("idefics2") / "assets" / "processor"
    for entry in source.iterdir():
        if entry.is_file():
            with resources.as_file(entry) as path:
                shutil.copyfile(path, os.path.join(directory, entry.name))


def demo_checkpoint() -> str:
    """A tiny random checkpoint, created once under the user cache."""
    cache = os.environ.get("IDEFICS2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "idefics2")
    path = os.path.join(cache, "demo-tiny")
    if not os.path.isfile(os.path.join(path, "config.json")):
        from .presets import write_random_checkpoint

        tmp = path + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write_random_checkpoint("tiny", tmp)
        copy_processor_files(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    from importlib import resources

    model_dir = args.model or os.environ.get("IDEFICS2_MODEL")
    if not model_dir:
        model_dir = demo_checkpoint()
        print(f"Using a random-weight tiny checkpoint ({model_dir}): the answer is meaningless text. "
              "Pass --model path/to/idefics2-8b for real answers.", file=sys.stderr)
    with resources.as_file(resources.files("idefics2") / "assets" / "sample.jpg") as sample:
        image = open_image(args.image or str(sample))
    t0 = time.perf_counter()
    model, processor = load_from_args(args, model_dir)
    print(f"loaded {model.num_parameters():,} parameters ({model.dtype}) in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    print(f"user> {args.prompt} [image]", file=sys.stderr)
    sys.stdout.write("assistant> ")
    run_chat_turn(model, processor, [user_message(args.prompt, 1)], [image], generation_kwargs(args), verbose=True)
    return 0


# ---- argument parsing ------------------------------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="checkpoint directory (config.json + safetensors + processor)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight dtype (default: as stored in the checkpoint)")
    p.add_argument("--threads", type=int, help="number of CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-image-splitting", action="store_true",
                   help="do not split images into 4 crops + the original (faster, fewer image tokens)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="weight-only quantization of the text decoder at load (faster CPU decoding)")


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="maximum number of generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--verbose", action="store_true", help="print timing (prefill s, tokens/s) to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idefics2", description="Run the Idefics2 vision-language model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="answer one prompt about images, streaming the answer")
    add_model_options(p)
    p.add_argument("--image", action="append", help="image file (repeat for several images)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the answer to JSON matching this schema file")
    add_sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("batch", help="answer a JSONL file of requests; resumable")
    add_model_options(p)
    p.add_argument("--input", required=True, help="JSONL requests: {id, prompt, images} or {id, messages, images}")
    p.add_argument("--output", required=True, help="JSONL answers, appended as they finish (resumes)")
    p.add_argument("--batch-size", type=int, default=4, help="requests generated together (default 4)")
    p.add_argument("--max-input-tokens", type=int, help="reject prompts longer than this (default: model limit)")
    p.add_argument("--json-schema", metavar="FILE",
                   help="JSON schema every answer must match (a line's own \"json_schema\" takes precedence)")
    add_sampling_options(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env IDEFICS2_API_KEY, or none)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="queued + running requests before 429 (default 64)")
    p.add_argument("--max-input-tokens", type=int, default=4096, help="prompt limit incl. image tokens (4096)")
    p.add_argument("--max-images-per-request", type=int, default=8, help="image limit per request (default 8)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixel limit per image (16.7M)")
    p.add_argument("--allow-local-media", metavar="DIR", help="allow file:// image URLs under DIR")
    p.add_argument("--allow-remote-media", action="store_true", help="allow http(s):// image URLs")
    p.add_argument("--served-model-name", help="model name in the API (default: the checkpoint folder name)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="write an int8/int4 weight-only quantized copy of a checkpoint")
    p.add_argument("--model", required=True, help="float checkpoint directory")
    p.add_argument("--method", required=True, choices=["int8", "int4"], help="int8 per channel or int4 grouped")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128], help="int4 group size")
    p.add_argument("--lm-head", choices=["int8", "int4", "float"],
                   help="how to store lm_head (default: the --method of the layers)")
    p.add_argument("--float-lm-head", action="store_true", help="the same as --lm-head float")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "auto"],
                   help="dtype of the parts that stay in floating point (vision tower, connector, embeddings, "
                        "norms); bfloat16 (default) is what the int8/int4 kernels compute in; auto keeps "
                        "the checkpoint's")
    p.add_argument("--output", required=True, help="output directory")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("estimate-memory", help="estimate weights, KV cache and activation memory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory (its config.json)")
    source.add_argument("--preset", choices=["tiny", "medium", "8b"], help="a built-in architecture")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["int8", "int4", "nf4"], help="quantized text decoder")
    p.add_argument("--image-splitting", choices=["on", "off"], default="on", help="5 sub-images per image")
    p.add_argument("--images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch", type=int, default=1, help="rows generated together (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generated tokens per row (default 256)")
    p.set_defaults(func=cmd_estimate_memory)

    p = sub.add_parser("init-random", help="write a random-weight checkpoint in the published layout")
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny", help="architecture size (default tiny)")
    p.add_argument("out", nargs="?", help="output directory (not needed with --dry-run)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored weight dtype")
    p.add_argument("--dry-run", action="store_true", help="only print the parameter count and memory estimate")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.set_defaults(func=cmd_init_random)

    from .training.cli import register as register_training

    register_training(sub)  # finetune, merge-lora

    p = sub.add_parser("demo", help="run generate on the bundled sample image (random tiny model by default)")
    add_model_options(p, required=False)
    p.add_argument("--image", help="use this image instead of the bundled sample")
    p.add_argument("--prompt", default="What do you see in this image?", help="the question")
    add_sampling_options(p, max_new_tokens=32)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .structured import ConstraintError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, CheckpointError, ConfigError, ConstraintError) as e:
        print(f"idefics2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m idefics2.cli` runs this file as __main__, a second copy of the module whose UserError is
    # not the one the subcommands raise: hand over to the imported module.
    from idefics2.cli import main as package_main

    sys.exit(package_main())
