"""The HTTP server: OpenAI's API over the serving engine (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus). Replies stream as server-sent events in OpenAI's chunk format when
``stream`` is set. Errors are OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``); a
client that goes away cancels its requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import threading
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from m1_jax.serving import openai_api as api
from m1_jax.serving.engine import Engine
from m1_jax.serving.requests import DoneEvent, QueueFull, Request, RequestError, TokenEvent

DISCONNECT_POLL_S = 0.5


def error_response(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))} if isinstance(e, QueueFull) else None
    return JSONResponse({"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=headers)


class _Pump:
    """Hands engine events to the event loop in batches: the engine's thread appends, and one wake-up of the
    loop per batch (not per token) delivers everything queued since the last one."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the event loop is gone: the server is stopping
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


class _Choices:
    """The engine requests of one HTTP request (one per choice), their events merged into one queue."""

    def __init__(self, engine: Engine, parsed: api.Parsed, pump: _Pump):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pump = pump
        self.requests = [Request(p, o, self._sink(i)) for i, (p, o) in enumerate(zip(parsed.prompts, parsed.options))]
        self.open = len(self.requests)
        try:
            for r in self.requests:
                engine.submit(r)
        except RequestError:
            self.cancel()
            raise

    def _sink(self, i: int):
        def put(ev):
            self.pump.put(self.queue, (i, ev))
        return put

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        while self.open:
            i, ev = await self.queue.get()
            if isinstance(ev, DoneEvent):
                self.open -= 1
            yield i, ev


def _server_error(done: DoneEvent) -> JSONResponse:
    return JSONResponse({"error": {"message": done.error, "type": "server_error", "param": None, "code": None}},
                        status_code=500)


def create_app(engine: Engine, model_name: str, tokenizer, *, metrics=None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``; the engine's loop runs while the app does
    and stops (cancelling what is left) when it shuts down."""

    pumps: list[_Pump] = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        pumps.append(_Pump(asyncio.get_running_loop()))
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="m1-jax", lifespan=lifespan)
    stop_ids = tuple(t for t in [tokenizer.eos_token_id] if t is not None)

    def room(prompt_len: int) -> int:
        return engine.context - prompt_len

    async def body_of(request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        return api.check_model(body, model_name)

    async def run(request: HTTPRequest, parse, answer, stream) -> Response:
        try:
            parsed = parse(await body_of(request), tokenizer, room, stop_ids)
            choices = _Choices(engine, parsed, pumps[-1])
        except RequestError as e:
            return error_response(e)
        if parsed.stream:
            return StreamingResponse(stream(choices, parsed), media_type="text/event-stream")
        return await answer(request, choices, parsed)

    async def collect(request: HTTPRequest, choices: _Choices) -> tuple[dict, dict] | None:
        """Every choice's token events and done event, or None when the client went away (cancelled)."""
        tokens: dict[int, list[TokenEvent]] = {i: [] for i in range(len(choices.requests))}
        done: dict[int, DoneEvent] = {}
        while len(done) < len(choices.requests):
            try:
                i, ev = await asyncio.wait_for(choices.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    choices.cancel()
                    return None
                continue
            if isinstance(ev, TokenEvent):
                tokens[i].append(ev)
            else:
                done[i] = ev
        return tokens, done

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await run(request, api.parse_chat, chat_answer, chat_stream)

    async def results(request: HTTPRequest, choices: _Choices):
        """(token events, done events) of every choice, or the response to send instead: 499 when the
        client went away, 500 when the engine failed."""
        got = await collect(request, choices)
        if got is None:
            return Response(status_code=499)
        failed = next((d for d in got[1].values() if d.error), None)
        return got if failed is None else _server_error(failed)

    async def chat_answer(request, choices: _Choices, parsed: api.Parsed):
        got = await results(request, choices)
        if isinstance(got, Response):
            return got
        tokens, done = got
        out = []
        for i in sorted(done):
            text = "".join(ev.text for ev in tokens[i]) + done[i].text
            msg, calls = api.chat_message(text)
            out.append({"index": i, "message": msg,
                        "logprobs": {"content": api.chat_logprobs(tokenizer, tokens[i])} if parsed.logprobs else None,
                        "finish_reason": api.finish_reason(done[i].finish_reason, calls)})
        return {"id": api.new_id("chatcmpl"), "object": "chat.completion", "created": api.now(), "model": model_name,
                "choices": out, "usage": _usage(done, parsed.n)}

    async def chat_stream(choices: _Choices, parsed: api.Parsed) -> AsyncIterator[str]:
        rid, created = api.new_id("chatcmpl"), api.now()
        streams = [api.ChatStream() for _ in choices.requests]
        done: dict[int, DoneEvent] = {}

        def chunk(i, delta, *, logprobs=None, finish=None):
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                         "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        try:
            for i in range(len(choices.requests)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, ev in choices.events():
                if isinstance(ev, TokenEvent):
                    deltas = streams[i].push(ev.text)
                    lp = ({"content": api.chat_logprobs(tokenizer, [ev])} if parsed.logprobs and not ev.stop_token
                          else None)
                    for k, d in enumerate(deltas or ([{}] if lp else [])):
                        yield chunk(i, d, logprobs=lp if k == 0 else None)
                    continue
                if ev.error:
                    yield _sse({"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}})
                    return
                done[i] = ev
                for d in streams[i].push(ev.text, final=True):
                    yield chunk(i, d)
                _, calls = api.chat_message(streams[i].text)
                yield chunk(i, {}, finish=api.finish_reason(ev.finish_reason, calls))
            if parsed.include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                            "choices": [], "usage": _usage(done, parsed.n)})
            yield "data: [DONE]\n\n"
        finally:
            choices.cancel()  # the client went away (or the stream ended): nothing left runs for it

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await run(request, api.parse_completion, completion_answer, completion_stream)

    async def completion_answer(request, choices: _Choices, parsed: api.Parsed):
        got = await results(request, choices)
        if isinstance(got, Response):
            return got
        tokens, done = got
        out = [{"index": i, "text": "".join(ev.text for ev in tokens[i]) + done[i].text,
                "logprobs": api.completion_logprobs(tokenizer, tokens[i]) if parsed.logprobs else None,
                "finish_reason": done[i].finish_reason} for i in sorted(done)]
        return {"id": api.new_id("cmpl"), "object": "text_completion", "created": api.now(), "model": model_name,
                "choices": out, "usage": _usage(done, parsed.n)}

    async def completion_stream(choices: _Choices, parsed: api.Parsed) -> AsyncIterator[str]:
        rid, created = api.new_id("cmpl"), api.now()
        done: dict[int, DoneEvent] = {}
        offsets = [0] * len(choices.requests)

        def chunk(i, text, *, logprobs=None, finish=None):
            return _sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                         "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        try:
            async for i, ev in choices.events():
                if isinstance(ev, TokenEvent):
                    lp = None
                    if parsed.logprobs and not ev.stop_token:
                        lp = api.completion_logprobs(tokenizer, [ev], offsets[i])
                    if ev.text or lp:
                        offsets[i] += len(ev.text)
                        yield chunk(i, ev.text, logprobs=lp)
                    continue
                if ev.error:
                    yield _sse({"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}})
                    return
                done[i] = ev
                yield chunk(i, ev.text, finish=ev.finish_reason)
            if parsed.include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                            "choices": [], "usage": _usage(done, parsed.n)})
            yield "data: [DONE]\n\n"
        finally:
            choices.cancel()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.now(),
                                            "owned_by": "m1-jax", "max_model_len": engine.context}]}

    @app.get("/health")
    async def health():
        if engine.alive:
            return {"status": "ok", "waiting": engine.waiting, "running": engine.running}
        return JSONResponse({"status": "stopped", "error": repr(engine.error)}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            return Response("metrics are off\n", status_code=404, media_type="text/plain")
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app


def _usage(done: dict[int, DoneEvent], n: int) -> dict:
    """Usage of a request's choices: each prompt counted once (choice ``i`` answers prompt ``i // n``)."""
    firsts = [done[i] for i in sorted(done) if i % n == 0]
    return api.usage(sum(d.prompt_tokens for d in firsts), sum(d.completion_tokens for d in done.values()),
                     sum(d.cached_tokens for d in firsts))


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def serve(app: FastAPI, host: str, port: int, *, shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Runs ``app`` until SIGINT / SIGTERM: new connections stop, requests in flight get up to
    ``shutdown_timeout`` seconds to finish, then the engine cancels what is left."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
