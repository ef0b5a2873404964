"""`idefics2 batch`: answer a JSONL file of requests in batches, resumably, one result line per request.

Input lines: `{"id": ..., "prompt": "...", "images": ["a.jpg"]}` or `{"id": ..., "messages": [...], "images": [...]}`
(TRL/OpenAI chat format: content is a string or a list of `{"type": "text"|"image"|"image_url"}` parts; image
paths are relative to the JSONL file). Output lines: `{"id", "answer", "prompt_tokens", "generated_tokens"}` or
`{"id", "error"}` for a request that cannot be run (the run goes on). Ids already in the output are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .cli import UserError, generation_kwargs, load_from_args, open_image, user_message


@dataclass
class Request:
    id: Any
    line: int
    messages: list[dict] = field(default_factory=list)
    image_refs: list[str] = field(default_factory=list)
    json_schema: Any = None
    error: str | None = None


def parse_request(obj: Any, line: int) -> Request:
    request = _parse_request(obj, line)
    if isinstance(obj, dict) and obj.get("json_schema") is not None:
        request.json_schema = obj["json_schema"]
    return request


def _parse_request(obj: Any, line: int) -> Request:
    if not isinstance(obj, dict):
        return Request(id=None, line=line, error=f"line {line}: expected a JSON object")
    rid = obj.get("id", f"line-{line}")
    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        return Request(rid, line, error="'images' must be a list of paths")
    if "messages" in obj:
        messages, extra_refs = normalize_messages(obj["messages"])
        if messages is None:
            return Request(rid, line, error=extra_refs[0])
        refs = images + extra_refs
        n_parts = sum(1 for m in messages for part in m["content"] if part["type"] == "image")
        if n_parts != len(refs):
            return Request(rid, line, error=f"{n_parts} image parts in messages but {len(refs)} images given")
        return Request(rid, line, messages=messages, image_refs=refs)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return Request(rid, line, error="each line needs a non-empty 'prompt' string or a 'messages' list")
    return Request(rid, line, messages=[user_message(prompt, len(images))], image_refs=images)


def normalize_messages(messages: Any) -> tuple[list[dict] | None, list[str]]:
    """Chat messages -> the template's form; `image_url` parts become image parts (their URLs returned)."""
    if not isinstance(messages, list) or not messages:
        return None, ["'messages' must be a non-empty list"]
    out, urls = [], []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            return None, ["each message needs a 'role' and 'content'"]
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content or []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image":
                parts.append({"type": "image"})
            elif kind == "image_url":
                url = part.get("image_url")
                urls.append(url.get("url") if isinstance(url, dict) else url)
                parts.append({"type": "image"})
            else:
                return None, [f"unsupported content part {part!r}"]
        out.append({"role": m["role"], "content": parts})
    return out, urls


def load_request_image(ref: str, base_dir: str):
    if ref.startswith("data:"):
        from .media import ImageLoadError
        from .media import open_image as load

        try:
            return load(ref)
        except ImageLoadError as e:
            raise UserError(str(e)) from e
    if ref.startswith(("http://", "https://")):
        raise UserError(f"remote images are not fetched by batch: {ref}")
    path = ref[len("file://"):] if ref.startswith("file://") else ref
    return open_image(path if os.path.isabs(path) else os.path.join(base_dir, path))


def read_requests(path: str) -> list[Request]:
    if not os.path.isfile(path):
        raise UserError(f"input file {path!r} does not exist")
    requests = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                requests.append(Request(id=f"line-{number}", line=number, error=f"invalid JSON: {e}"))
                continue
            requests.append(parse_request(obj, number))
    return requests


def finished_ids(path: str) -> set:
    done = set()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(json.dumps(json.loads(line).get("id")))
                except (json.JSONDecodeError, AttributeError):
                    continue  # a line cut by an interruption: that request runs again
    return done


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{rate:.2f} items/s ETA {eta:.0f}s ")
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


def run_batch(args: argparse.Namespace) -> int:
    requests = read_requests(args.input)
    done = finished_ids(args.output)
    todo = [r for r in requests if json.dumps(r.id) not in done]
    print(f"{len(requests)} requests, {len(requests) - len(todo)} already answered, {len(todo)} to go",
          file=sys.stderr)
    if not todo:
        return 0
    model, processor = load_from_args(args)
    limit = args.max_input_tokens or (model.config.text_config.max_position_embeddings - args.max_new_tokens)
    base_dir = os.path.dirname(os.path.abspath(args.input))
    gen = generation_kwargs(args)
    progress = Progress(len(todo))
    with open(args.output, "a", encoding="utf-8") as out:
        def write(record: dict) -> None:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()

        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start:start + args.batch_size]
            ready = []
            for request in chunk:
                if request.error:
                    write({"id": request.id, "error": request.error})
                    continue
                try:
                    images = [load_request_image(ref, base_dir) for ref in request.image_refs]
                    text = processor.apply_chat_template(request.messages, add_generation_prompt=True)
                    n_tokens = len(processor(text=text, images=images or None)["input_ids"][0])
                    if n_tokens > limit:
                        raise UserError(f"prompt has {n_tokens} tokens (images included), over the limit of {limit}")
                    ready.append((request, text, images, n_tokens))
                except (UserError, ValueError) as e:
                    write({"id": request.id, "error": str(e)})
            if ready:
                for record in generate_rows(model, processor, ready, gen):
                    write(record)
            progress.update(len(chunk))
    return 0


def generate_rows(model, processor, ready: list, gen: dict[str, Any]) -> list[dict]:
    texts = [text for _, text, _, _ in ready]
    images = [imgs for _, _, imgs, _ in ready]
    inputs = processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")
    gen = dict(gen)
    default_schema = gen.pop("json_schema", None)
    schemas = [request.json_schema if request.json_schema is not None else default_schema for request, *_ in ready]
    if any(s is not None for s in schemas):
        gen["json_schema"] = schemas
    output = model.generate(**dict(inputs), tokenizer=processor.tokenizer, **gen)
    width = inputs["input_ids"].shape[1]
    pad, eos = gen.get("pad_token_id", 0), set(model.generation_config.eos_ids) if model.generation_config else set()
    records = []
    for (request, _, _, n_tokens), row in zip(ready, output[:, width:].tolist()):
        new = [t for t in row if t != pad]
        generated = len([t for t in new if t not in eos]) + (1 if any(t in eos for t in new) else 0)
        answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        records.append({"id": request.id, "answer": answer, "prompt_tokens": n_tokens,
                        "generated_tokens": generated})
    return records
