"""The OpenAI-compatible HTTP app: /v1/chat/completions (streamed or not), /v1/models, /health.

    request ─► parse (requests.py) ─► chat template + processor ─► budget check
            ─► pool: a free worker (its conversation's when free; queue full: 429)
            ─► tokens as the worker accepts them ─► text (stop strings) ─► JSON or SSE

Errors before the first token are HTTP errors in OpenAI's JSON; after it (streaming) an
error event ends the stream. A client that leaves cancels its generation at the next pass.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from vispec.runtime.errors import PromptTooLongError, VispecError
from vispec.runtime.generate import GenerationResult, check_fits
from vispec.runtime.pipeline import Pipeline

from .pool import Pool, QueueFull, TokenStream, generate
from .requests import ApiError, ChatRequest, parse_chat
from .text import ReplyText

log = logging.getLogger("vispec.runtime.serve")
DISCONNECT_POLL_S = 0.1


@dataclass(frozen=True)
class Settings:
    """What the app serves and how: the model id clients name, the waiting requests allowed
    beyond the busy workers, an API key (None: open) and whether local image paths go."""

    model: str
    queue: int = 8
    api_key: str | None = None
    allow_local_images: bool = False
    retry_after_s: int = 1


def create_app(pipelines: list[Pipeline], settings: Settings) -> FastAPI:
    """The app over one worker per pipeline (the pipelines are closed at shutdown)."""
    pool = Pool(pipelines, settings.queue)
    front = pipelines[0]  # prepares prompts: every pipeline holds the same artifacts
    preparing = threading.Lock()  # one processor call at a time

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.loop = asyncio.get_running_loop()
        yield
        pool.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"Retry-After": str(settings.retry_after_s)} if e.status == 429 else None
        return JSONResponse(e.body(), e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return await api_error(request, ApiError(f"{request.method} {request.url.path}: "
                                                 f"{e.detail}", e.status_code))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("internal error")
        return await api_error(request, ApiError(f"internal error ({type(e).__name__}); the "
                                                 f"server goes on serving", 500,
                                                 kind="server_error"))

    def authorize(request: Request) -> None:
        if settings.api_key and request.headers.get("authorization") != \
                f"Bearer {settings.api_key}":
            raise ApiError("missing or wrong API key. Hint: send the header Authorization: "
                           "Bearer <key> (the server's --api-key)", 401, code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(pool.workers), "busy": pool.busy,
                "waiting": len(pool.waiting)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": settings.model, "object": "model",
                                            "created": 0, "owned_by": "vispec-export"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"the body is not valid JSON ({e}). Hint: send a JSON object "
                           f"with Content-Type: application/json") from None
        chat, prompt = await asyncio.to_thread(prepare, body)
        max_new = chat.max_tokens or front.target.max_len - len(prompt.input_ids)
        try:
            check_fits(prompt, max(max_new, 1), front.target.max_len)
        except PromptTooLongError as e:
            raise ApiError(str(e), param="messages", code="context_length_exceeded") from None
        run = Run(chat, front.target.processor.tokenizer, front.target.eos_token_ids)
        run.task = asyncio.create_task(generate(
            pool, prompt, max_new, chat.speculative, chat.sampling, run.tokens, run.cancel))
        first = await run.first(request)
        if chat.stream:
            return StreamingResponse(run.events(first, settings.model),
                                     media_type="text/event-stream")
        try:
            text = await run.collect(first, request)
        finally:
            run.stop()
        return run.completion(settings.model, text)

    def prepare(body):
        """The checked request and its prompt (runs in a thread)."""
        chat = parse_chat(body, settings.model, settings.allow_local_images)
        try:
            with preparing:
                prompt = front.target.glue.prepare_chat(front.target.processor, chat.messages,
                                                        chat.images)
        except (VispecError, ValueError) as e:
            raise ApiError(f"cannot build the prompt: {e}", param="messages") from None
        return chat, prompt

    return app


class Run:
    """One request's generation as the HTTP side sees it: its tokens, text and ending."""

    def __init__(self, chat: ChatRequest, tokenizer, eos: set[int]):
        self.chat, self.eos = chat, eos
        self.tokens, self.cancel = TokenStream(), threading.Event()
        self.text = ReplyText(tokenizer, chat.stop)
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.task: asyncio.Task | None = None
        self.generated: list[int] = []

    async def first(self, request: Request) -> list[int] | None:
        """The first tokens (None: the generation failed before any; raises its error as an
        ``ApiError``). Waits in the queue and through the prefill; a client that leaves
        meanwhile cancels it."""
        try:
            first = await self._watch(self.tokens.get(), request)
        except BaseException:
            self.stop()
            raise
        if first is None:
            await asyncio.wait([self.task])
            self.result()
        return first

    async def _watch(self, awaitable, request: Request):
        """``awaitable``, stopping the generation when the client disconnects meanwhile."""
        waiting = asyncio.ensure_future(awaitable)
        while not waiting.done():
            await asyncio.wait([waiting], timeout=DISCONNECT_POLL_S)
            if not waiting.done() and await request.is_disconnected():
                waiting.cancel()
                self.stop()
                raise ApiError("the client disconnected", 499)
        return waiting.result()

    def stop(self) -> None:
        """End the generation at its next pass (or its wait for a worker)."""
        self.cancel.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def result(self) -> GenerationResult:
        """The finished generation; its error as an ``ApiError``."""
        try:
            return self.task.result()
        except QueueFull as e:
            raise ApiError(f"{e} Hint: retry after the Retry-After seconds", 429,
                           kind="rate_limit_error") from None
        except VispecError as e:
            raise ApiError(f"{e}", param="messages") from None

    def pieces(self, tokens: list[int]) -> str:
        self.generated.extend(tokens)
        piece = self.text.feed(tokens)
        if self.text.stopped:
            self.cancel.set()
        return piece

    async def collect(self, first: list[int] | None, request: Request) -> str:
        """The whole reply (non-streaming)."""
        tokens = first
        while tokens is not None:
            self.pieces(tokens)
            tokens = await self._watch(self.tokens.get(), request)
        await asyncio.wait([self.task])
        self.result()
        self.text.finish()
        return self.text.text

    async def events(self, first: list[int] | None, model: str):
        """Server-sent events: role, content pieces, the finish, usage, [DONE]."""
        try:
            yield self._chunk(model, {"role": "assistant", "content": ""})
            tokens = first
            while tokens is not None:
                piece = self.pieces(tokens)
                if piece:
                    yield self._chunk(model, {"content": piece})
                tokens = await self.tokens.get()
            await asyncio.wait([self.task])
            result = self.result()
            piece = self.text.finish()
            if piece:
                yield self._chunk(model, {"content": piece})
            yield self._chunk(model, {}, self.finish_reason())
            if self.chat.include_usage:
                yield _sse({**self._head(model), "choices": [], **self.usage(result)})
        except ApiError as e:
            yield _sse(e.body())
        except Exception as e:  # noqa: BLE001  (the stream has begun: report, do not raise)
            log.exception("internal error")
            yield _sse(ApiError(f"internal error ({type(e).__name__})", 500,
                                kind="server_error").body())
        finally:
            self.stop()  # a client that left (the stream was cancelled) ends the generation
        yield "data: [DONE]\n\n"

    def finish_reason(self) -> str:
        ended = self.text.stopped or (self.generated and self.generated[-1] in self.eos)
        return "stop" if ended else "length"

    def usage(self, result: GenerationResult) -> dict:
        s = result.stats
        rounds = s.rounds
        return {"usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                          "total_tokens": s.prompt_tokens + s.new_tokens,
                          "prompt_tokens_details": {"cached_tokens": s.reused_tokens}},
                "vispec": {"speculative": any(r.tree is not None for r in rounds),
                           "target_passes": s.target_passes,
                           "tokens_per_pass": round(s.mean_accepted, 4),
                           "draft_ms": round(sum(r.draft_ms for r in rounds), 3),
                           "target_ms": round(sum(r.verify_ms for r in rounds), 3),
                           "host_ms": round(sum(r.host_ms for r in rounds), 3),
                           "time_to_first_token_s": round(s.prefill_seconds, 6),
                           "decode_tokens_per_second": round(s.tokens_per_second, 3),
                           "reused_tokens": s.reused_tokens,
                           "dropped_tokens": s.dropped_tokens}}

    def completion(self, model: str, text: str) -> dict:
        message = {"role": "assistant", "content": text}
        return {**self._head(model, "chat.completion"), **self.usage(self.result()),
                "choices": [{"index": 0, "message": message,
                             "finish_reason": self.finish_reason()}]}

    def _head(self, model: str, kind: str = "chat.completion.chunk") -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": model}

    def _chunk(self, model: str, delta: dict, finish: str | None = None) -> str:
        return _sse({**self._head(model), "choices": [{"index": 0, "delta": delta,
                                                       "finish_reason": finish}]})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
