"""Cost of constrained decoding: schema compile time and per-token overhead vs unconstrained decoding.

    python benchmarks/structured.py [--preset medium] [--new-tokens 48] [--batches 1,8]

On a random `--preset` checkpoint with the real 32003-token tokenizer: compile time of a few schemas (first
compile and cached), then decode time per token of the same prompts with and without a JSON-schema
constraint, at each batch size, measured in one run. The constrained run is forced to the same length
(a schema that does not let the output end early), so the comparison is per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

SCHEMAS = {
    "small": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]},
    "invoice": {
        "type": "object",
        "properties": {
            "number": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
            "date": {"type": "string", "format": "date"},
            "lines": {"type": "array", "maxItems": 20, "items": {"type": "object", "properties": {
                "item": {"type": "string", "maxLength": 40}, "qty": {"type": "integer", "minimum": 1},
                "price": {"type": "number"}}, "required": ["item", "qty", "price"]}},
            "total": {"type": "number"}, "currency": {"enum": ["EUR", "USD", "GBP"]},
        },
        "required": ["number", "lines", "total", "currency"],
    },
}
# Long enough never to finish within the budget: every row decodes exactly `--new-tokens` tokens.
LONG = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--checkpoint")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from idefics2.cli import copy_processor_files
    from idefics2.pipeline import pipeline
    from idefics2.presets import write_random_checkpoint
    from idefics2.structured import Constraint, GrammarEngine

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if not path:
            path = write_random_checkpoint(args.preset, os.path.join(tmp, "ckpt"))
            copy_processor_files(path)
        runner = pipeline(path)
        model, processor = runner.model, runner.processor
        tokenizer = processor.tokenizer

        t = time.perf_counter()
        engine = GrammarEngine(tokenizer, model.config.vocab_size, [2, 32002])
        engine.matcher(Constraint.regex("warm-up"))  # the first matcher builds llguidance's token trie
        print(f"token table and trie (once per tokenizer): {(time.perf_counter() - t) * 1e3:.0f} ms")
        for name, schema in SCHEMAS.items():
            constraint = Constraint.json_schema(schema)
            t = time.perf_counter()
            engine.grammar(constraint)
            first = time.perf_counter() - t
            t = time.perf_counter()
            engine.matcher(constraint)
            cached = time.perf_counter() - t
            print(f"schema {name:8}: compile {first * 1e3:.2f} ms, cached grammar -> matcher {cached * 1e3:.2f} ms")

        print(f"{'batch':>6}{'free ms/tok':>13}{'json ms/tok':>13}{'overhead':>10}")
        for batch in (int(b) for b in args.batches.split(",")):
            inputs = processor(text=[f"Extract the fields of document {i}." for i in range(batch)], padding=True,
                               return_tensors="pt")
            common = dict(max_new_tokens=args.new_tokens, eos_token_id=None, tokenizer=tokenizer)

            def timed(inputs=inputs, common=common, **extra):
                times = []
                for _ in range(args.repeats + 1):
                    t = time.perf_counter()
                    model.generate(**inputs, **common, **extra)
                    times.append(time.perf_counter() - t)
                return statistics.median(times[1:]) / args.new_tokens

            with torch.inference_mode():
                free = timed()
                constrained = timed(json_schema=LONG)
            print(f"{batch:>6}{free * 1e3:>13.2f}{constrained * 1e3:>13.2f}{(constrained / free - 1) * 100:>9.1f}%")


if __name__ == "__main__":
    main()
