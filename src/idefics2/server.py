"""OpenAI-compatible HTTP server (`idefics2 serve`): FastAPI in front of the continuous-batching engine.

Safe by default: binds 127.0.0.1, accepts images only as base64 `data:` URIs unless local files
(`--allow-local-media DIR`) or remote URLs (`--allow-remote-media`) are enabled, bounds the queue, the
prompt, the number and size of images, and logs no prompt or image bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from .engine import Engine, EngineRequest, ImageInput
from .generation import GenerationConfig
from .openmp import run_in_short_lived_thread, use_one_openmp_thread
from .pipeline import processing_settings_key
from .structured import Constraint, ConstraintError

log = logging.getLogger("idefics2.server")

REMOTE_MAX_BYTES = 20 * 2**20
REMOTE_TIMEOUT_S = 10.0


# ---- request models ----------------------------------------------------------------------------------------------
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class SamplingParams(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingParams):
    prompt: str


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_input_tokens: int | None = None
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096
    allow_local_media: str | None = None
    allow_remote_media: bool = False
    default_max_tokens: int = 256
    shutdown_timeout: float = 30.0


# ---- media ---------------------------------------------------------------------------------------------------------
def fetch_image_bytes(url: str, settings: ServerSettings) -> bytes:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, "image data URIs must be base64 encoded (data:image/...;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError as e:
            raise APIError(400, f"image_url: invalid base64 data ({e})") from e
    if url.startswith("file://"):
        if not settings.allow_local_media:
            raise APIError(400, "file:// image URLs are disabled (start the server with --allow-local-media DIR)")
        root = os.path.realpath(settings.allow_local_media)
        path = os.path.realpath(url[len("file://"):])
        if os.path.commonpath([root, path]) != root:
            raise APIError(400, f"file:// URLs must point inside {root}")
        if not os.path.isfile(path):
            raise APIError(400, f"image file {url} does not exist")
        with open(path, "rb") as f:
            return f.read()
    if url.startswith(("http://", "https://")):
        if not settings.allow_remote_media:
            raise APIError(400, "http(s) image URLs are disabled (start the server with --allow-remote-media)")
        from .media import ImageLoadError, fetch_url

        try:
            return fetch_url(url, timeout=REMOTE_TIMEOUT_S, max_bytes=REMOTE_MAX_BYTES)
        except (OSError, ImageLoadError) as e:
            raise APIError(400, f"could not fetch image {url}: {e}") from e
    raise APIError(400, "image_url must be a data: URI (or file:// / http(s):// where enabled)")


def decode_image(data: bytes, index: int, settings: ServerSettings):
    from .media import ImageLoadError, open_image

    try:
        return open_image(data, max_image_pixels=settings.max_image_pixels)
    except ImageLoadError as e:
        hint = " (--max-image-pixels)" if "max_image_pixels" in str(e) else ""
        raise APIError(400, f"image {index}: {e}{hint}") from e


# ---- the service ---------------------------------------------------------------------------------------------------
class Service:
    """Turns API requests into engine requests and engine results into API responses."""

    def __init__(self, model, processor, settings: ServerSettings) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        text = model.config.text_config
        capacity = min(text.max_position_embeddings, (settings.max_input_tokens or 4096) + 1024)
        self.engine = Engine(model, tokenizer=processor.tokenizer, max_batch=settings.max_batch_size,
                             max_tokens_per_request=capacity)
        self.ready = False
        self.http_requests = 0

    def start(self) -> None:
        self.engine.start()
        self.ready = True

    # Prompt building ---------------------------------------------------------------------------------------------
    def chat_inputs(self, messages: list[ChatMessage]) -> tuple[str, list[tuple[str, Any]]]:
        template_messages, images = [], []
        for message in messages:
            parts = []
            content = message.content
            if content is None:
                content = []
            if isinstance(content, str):
                parts.append({"type": "text", "text": content})
            else:
                for part in content:
                    if part.type == "text":
                        parts.append({"type": "text", "text": part.text or ""})
                    else:
                        if part.image_url is None:
                            raise APIError(400, "an image_url part needs an image_url object with a url")
                        if len(images) >= self.settings.max_images_per_request:
                            raise APIError(400, f"too many images: at most {self.settings.max_images_per_request} "
                                                "per request (--max-images-per-request)")
                        data = fetch_image_bytes(part.image_url.url, self.settings)
                        images.append((hashlib.sha256(data).hexdigest(), decode_image(data, len(images),
                                                                                        self.settings)))
                        parts.append({"type": "image"})
            template_messages.append({"role": message.role, "content": parts})
        text = self.processor.apply_chat_template(template_messages, add_generation_prompt=True)
        return text, images

    def engine_inputs(self, text: str, images: list[tuple[str, Any]]) -> tuple[torch.Tensor, list[ImageInput]]:
        processor = self.processor
        encoded = processor(text=text, images=[img for _, img in images] or None, return_tensors="pt")
        input_ids = encoded["input_ids"][0]
        limit = self.settings.max_input_tokens
        if limit is not None and input_ids.numel() > limit:
            raise APIError(400, f"prompt has {input_ids.numel()} tokens (images included), over the limit of "
                                f"{limit} (--max-input-tokens)")
        inputs = []
        if images:
            per_image = 5 if processor.image_processor.do_image_splitting else 1
            pixels, masks = encoded["pixel_values"][0], encoded["pixel_attention_mask"][0]
            settings_key = processing_settings_key(processor)
            for i, (digest, _) in enumerate(images):
                sub_pixels = pixels[i * per_image:(i + 1) * per_image]
                sub_masks = masks[i * per_image:(i + 1) * per_image]
                # Crop to this image's own extent so its features do not depend on the other images.
                h = int(sub_masks.any(dim=2).sum(dim=1).max())
                w = int(sub_masks.any(dim=1).sum(dim=1).max())
                inputs.append(ImageInput(
                    key=hashlib.sha256(f"{digest}|{settings_key}".encode()).hexdigest(),
                    pixel_values=sub_pixels[None, :, :, :h, :w].contiguous(),
                    pixel_attention_mask=sub_masks[None, :, :h, :w].contiguous(),
                ))
        return input_ids, inputs

    def generation_config(self, params: SamplingParams, prompt_tokens: int) -> GenerationConfig:
        base = self.model.generation_config or GenerationConfig()
        max_tokens = params.max_completion_tokens or params.max_tokens or self.settings.default_max_tokens
        stops = [params.stop] if isinstance(params.stop, str) else (params.stop or None)
        if stops and any(not s for s in stops):
            raise APIError(400, "stop strings must be non-empty")
        sampling = params.temperature > 0
        return base.updated(
            max_new_tokens=max_tokens, do_sample=sampling, temperature=params.temperature if sampling else None,
            top_p=params.top_p, top_k=0, stop_strings=stops,
        )

    def constraint(self, params: SamplingParams, config: GenerationConfig) -> Constraint | None:
        """The response_format as a grammar constraint, compiled now so that a bad schema is a 400."""
        fmt = params.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise APIError(400, "response_format type 'json_schema' needs a json_schema object with a schema")
        try:
            if fmt.type == "json_schema":
                constraint = Constraint.json_schema(fmt.json_schema.schema_)
            else:
                constraint = Constraint.json_object()
            self.engine.grammar(config).grammar(constraint)
        except ConstraintError as e:
            raise APIError(400, f"response_format: {e}") from e
        return constraint

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.settings.model_name!r}",
                           kind="model_not_found")

    def check_capacity(self, n: int) -> None:
        waiting = self.engine.queue_depth + self.engine.batch_size
        if waiting + n > self.settings.max_queue:
            raise APIError(429, f"the server is busy ({waiting} requests queued or running, limit "
                                f"{self.settings.max_queue}); retry shortly", kind="rate_limit_exceeded",
                           headers={"Retry-After": "1"})

    def submit(self, input_ids, images, config: GenerationConfig, seed: int | None, on_token,
               constraint: Constraint | None = None) -> EngineRequest:
        request = EngineRequest(input_ids=input_ids, images=images, config=config, seed=seed, on_token=on_token,
                                constraint=constraint)
        try:
            return self.engine.submit(request)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        except RuntimeError as e:
            raise APIError(503, str(e), kind="unavailable") from e

    def text_of(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True)


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    if not stops:
        return text, False
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def metrics_text(service: Service) -> str:
    engine, m = service.engine, service.engine.metrics
    lines = [
        "# TYPE idefics2_requests_total counter",
        *[f'idefics2_requests_total{{status="{k}"}} {v}' for k, v in sorted(m.requests_total.items())],
        "# TYPE idefics2_http_requests_total counter", f"idefics2_http_requests_total {service.http_requests}",
        "# TYPE idefics2_queue_depth gauge", f"idefics2_queue_depth {engine.queue_depth}",
        "# TYPE idefics2_batch_size gauge", f"idefics2_batch_size {engine.batch_size}",
        "# TYPE idefics2_generated_tokens_total counter", f"idefics2_generated_tokens_total {m.generated_tokens}",
        "# TYPE idefics2_prompt_tokens_total counter", f"idefics2_prompt_tokens_total {m.prompt_tokens}",
        "# TYPE idefics2_tokens_per_second gauge", f"idefics2_tokens_per_second {m.tokens_per_second():.3f}",
        "# TYPE idefics2_time_to_first_token_seconds summary",
        f"idefics2_time_to_first_token_seconds_sum {m.ttft_sum:.6f}",
        f"idefics2_time_to_first_token_seconds_count {m.ttft_count}",
        "# TYPE idefics2_image_feature_cache_hits_total counter",
        f"idefics2_image_feature_cache_hits_total {engine.features.hits}",
        "# TYPE idefics2_image_feature_cache_misses_total counter",
        f"idefics2_image_feature_cache_misses_total {engine.features.misses}",
        "# TYPE idefics2_image_feature_cache_bytes gauge", f"idefics2_image_feature_cache_bytes {engine.features.bytes}",
    ]
    return "\n".join(lines) + "\n"


# ---- the app -------------------------------------------------------------------------------------------------------
def create_app(service: Service):
    @asynccontextmanager
    async def lifespan(app):
        # Request work (image decoding, processing) runs on these threads, single-threaded in torch, so that
        # the engine thread's OpenMP team stays the only one (see idefics2.openmp).
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="idefics2-request", initializer=use_one_openmp_thread))
        if not service.ready:
            service.start()
        yield
        await asyncio.to_thread(service.engine.shutdown, service.settings.shutdown_timeout)

    app = FastAPI(title="idefics2", lifespan=lifespan)

    def error_response(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": kind}},
                            status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'body'}: {e.get('msg')}" for e in exc.errors()
        )
        return error_response(400, f"invalid request: {problems}", "invalid_request_error")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        service.http_requests += 1
        if service.settings.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {service.settings.api_key}":
                return error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                      "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not service.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(service), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.settings.model_name, "object": "model",
                                            "created": 0, "owned_by": "idefics2"}]}

    async def run(params: SamplingParams, text: str, images: list, request: Request, kind: str):
        service.check_model(params.model)
        input_ids, image_inputs = await asyncio.to_thread(service.engine_inputs, text, images)
        config = service.generation_config(params, int(input_ids.numel()))
        constraint = service.constraint(params, config)
        service.check_capacity(params.n)
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in range(params.n)]
        submitted = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i

            def on_token(token, q=queues[i]):
                loop.call_soon_threadsafe(q.put_nowait, token)

            submitted.append(service.submit(input_ids, image_inputs, config, seed, on_token, constraint))
        for q, r in zip(queues, submitted):
            threading_done(r, loop, q)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        prompt_tokens = int(input_ids.numel())
        if params.stream:
            return StreamingResponse(
                stream_events(rid, kind, params, submitted, queues, prompt_tokens, request),
                media_type="text/event-stream",
            )
        try:
            for q in queues:
                while True:
                    item = await q.get()
                    if item is None:
                        break
                    if await request.is_disconnected():
                        for other in submitted:
                            other.cancel()
        finally:
            for r in submitted:
                if not r.done.is_set():
                    r.cancel()
        choices = []
        stops = config.stop_strings
        for i, r in enumerate(submitted):
            if r.finish_reason == "error":
                raise APIError(400, r.error or "generation failed")
            content, _ = cut_at_stop(service.text_of(r.tokens), stops)
            finish = "stop" if r.finish_reason == "stop" else "length"
            if kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": content},
                                "finish_reason": finish, "logprobs": None})
            else:
                choices.append({"index": i, "text": content, "finish_reason": finish, "logprobs": None})
        completion = sum(len(r.tokens) for r in submitted)
        log_request(rid, prompt_tokens, submitted, "ok")
        return {
            "id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": service.settings.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
        }

    async def stream_events(rid, kind, params, submitted, queues, prompt_tokens, request):
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        stops = [params.stop] if isinstance(params.stop, str) else (params.stop or None)
        hold = max((len(s) for s in stops), default=1) - 1 if stops else 0

        def chunk(i, delta_text=None, finish=None, role=False):
            if kind == "chat":
                delta = {"role": "assistant"} if role else {}
                if delta_text:
                    delta["content"] = delta_text
                choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": i, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": obj, "created": created, "model": service.settings.model_name,
                    "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        status = "ok"
        try:
            for i, (q, r) in enumerate(zip(queues, submitted)):
                if kind == "chat":
                    yield chunk(i, role=True)
                sent = 0
                stopped = False
                while True:
                    item = await q.get()
                    if item is None:
                        break
                    if stopped:
                        continue
                    text = service.text_of(r.tokens)
                    if text.endswith("\ufffd"):
                        continue
                    text, stopped = cut_at_stop(text, stops)
                    limit = len(text) if stopped else max(sent, len(text) - hold)
                    if limit > sent:
                        yield chunk(i, text[sent:limit])
                        sent = limit
                    if stopped:
                        r.cancel()
                if r.finish_reason == "error":
                    status = "error"
                    yield f"data: {json.dumps({'error': {'message': r.error, 'type': 'server_error'}})}\n\n"
                    break
                text, cut = cut_at_stop(service.text_of(r.tokens), stops)
                if len(text) > sent:
                    yield chunk(i, text[sent:])
                finish = "stop" if (cut or r.finish_reason in ("stop", "cancelled")) else "length"
                yield chunk(i, finish=finish)
            if params.stream_options and params.stream_options.include_usage:
                completion = sum(len(r.tokens) for r in submitted)
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
                body = {"id": rid, "object": obj, "created": created, "model": service.settings.model_name,
                        "choices": [], "usage": usage}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = "disconnected"
            raise
        finally:
            for r in submitted:
                if not r.done.is_set():
                    r.cancel()
            log_request(rid, prompt_tokens, submitted, status)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        text, images = await asyncio.to_thread(service.chat_inputs, body.messages)
        return await run(body, text, images, request, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await run(body, body.prompt, [], request, "completion")

    return app


def threading_done(request: EngineRequest, loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> None:
    """Put a None sentinel on `q` once the engine finishes `request`."""

    def wait() -> None:
        request.done.wait()
        loop.call_soon_threadsafe(q.put_nowait, None)

    loop.run_in_executor(None, wait)


def log_request(rid: str, prompt_tokens: int, requests: list[EngineRequest], status: str) -> None:
    first = [r.first_token_at - r.submitted_at for r in requests if r.first_token_at]
    ends = [r.finished_at - r.submitted_at for r in requests if r.finished_at]
    reasons = ",".join(str(r.finish_reason) for r in requests)
    log.info("request %s prompt_tokens=%d generated_tokens=%d ttft=%.3fs total=%.3fs finish=%s status=%s",
             rid, prompt_tokens, sum(len(r.tokens) for r in requests), min(first, default=float("nan")),
             max(ends, default=float("nan")), reasons, status)


def serve(args) -> int:
    """Entry point of `idefics2 serve`."""
    import uvicorn

    from .cli import load_from_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Loaded on a thread that then exits, and the main thread kept single-threaded: the engine thread's OpenMP
    # team must be the process's only one (see idefics2.openmp).
    model, processor = run_in_short_lived_thread(load_from_args, args)
    use_one_openmp_thread()
    settings = ServerSettings(
        model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
        api_key=args.api_key or os.environ.get("IDEFICS2_API_KEY") or None,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_input_tokens=args.max_input_tokens,
        max_images_per_request=args.max_images_per_request, max_image_pixels=args.max_image_pixels,
        allow_local_media=args.allow_local_media, allow_remote_media=args.allow_remote_media,
    )
    service = Service(model, processor, settings)
    service.start()
    log.info("serving %s on http://%s:%d (batch %d, queue %d)", settings.model_name, args.host, args.port,
             settings.max_batch_size, settings.max_queue)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=int(settings.shutdown_timeout))
    return 0
