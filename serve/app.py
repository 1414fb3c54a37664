"""The OpenAI-compatible HTTP API over a `FusionEngine` (FastAPI).

    app = create_app(engine, api_key="secret")            # a whole app: uvicorn.run(app)
    host_app.include_router(router(engine))               # or mount the routes in a host's own app

Routes:
    POST /v1/chat/completions   messages -> answer (stream: true -> server-sent events)
    POST /v1/completions        prompt -> answer (the prompt is the question)
    GET  /v1/models             the served model
    GET  /healthz               {"status": "ok", "release": ..., "model": ...}
    GET  /metrics               Prometheus text (`kvfuse.serve.metrics`)

kvfuse's options travel in an extension object of the body,
`"kvfuse": {"chunk_ids": [...], "top_k": 4, "selector": "kvfuse", "ratio": 0.15}`
(the OpenAI Python client sends it with `extra_body={"kvfuse": {...}}`); responses carry `usage`
and a `kvfuse` object (chunk_ids, doc_ids, release, n_reused, n_recomputed, ttft_s, fused,
retrieval_scores, notes).
Bad input is a 4xx in OpenAI's error shape naming the field (`errors.APIError`); the engine's
`RequestError` decides about the kvfuse fields. With an api key, /v1/* needs
`Authorization: Bearer <key>` (401 otherwise); /healthz and /metrics stay open.
Nothing here blocks the event loop: admission runs in a worker thread, answers are awaited.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, replace

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from kvfuse.runtime import Answer, RequestError

from .errors import APIError, from_request_error
from .metrics import ServerMetrics
from .schemas import ChatCompletionRequest, CompletionRequest, parse

__all__ = ["ServeConfig", "create_app", "router"]


@dataclass
class ServeConfig:
    """How the HTTP layer treats requests."""

    api_key: str | None = None          # None: no authentication (bind to loopback!)
    max_body_bytes: int = 1 << 20       # larger bodies get 413
    default_max_tokens: int = 128       # when the body gives neither max_tokens nor max_completion_tokens


class _OpenAIRoute(APIRoute):
    """Turns APIError (raised by the handler or its dependencies) into OpenAI's error JSON, and
    counts every answer in the router's metrics; so a router mounted in a host app brings its own
    error shape without touching the host's exception handlers."""

    metrics: ServerMetrics | None = None

    def get_route_handler(self):
        handler = super().get_route_handler()
        path = self.path

        async def wrapped(request: Request) -> Response:
            try:
                response = await handler(request)
            except APIError as e:
                response = e.response()
            if self.metrics is not None:
                self.metrics.count(path, response.status_code)
            return response

        return wrapped


def _key_checker(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           param="authorization", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "wrong API key", param="authorization", code="invalid_api_key")
    return check


async def read_json(request: Request, limit: int):
    """The body decoded as JSON; 413 past `limit` bytes (read no further), 400 if not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, more than the server's limit of {limit}",
                       code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is more than the server's limit of {limit} bytes",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


def _kvfuse_info(answer: Answer) -> dict:
    return {"chunk_ids": answer.chunk_ids, "doc_ids": answer.doc_ids, "release": answer.release,
            "n_reused": answer.n_reused, "n_recomputed": answer.n_recomputed, "n_question": answer.n_question,
            "ttft_s": answer.ttft_s, "total_s": answer.total_s, "fused": answer.fused,
            "retrieval_scores": answer.retrieval_scores, "notes": answer.notes}


def _usage(answer: Answer) -> dict:
    prompt = answer.n_reused + answer.n_recomputed + answer.n_question
    return {"prompt_tokens": prompt, "completion_tokens": answer.n_generated,
            "total_tokens": prompt + answer.n_generated}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


class _Completer:
    """Runs one chat or text completion against the engine: plain JSON or an SSE stream."""

    def __init__(self, engine, metrics: ServerMetrics, config: ServeConfig):
        self.engine, self.metrics, self.config = engine, metrics, config

    async def __call__(self, body: ChatCompletionRequest | CompletionRequest, request: Request, chat: bool):
        if body.model not in (None, "", self.engine.model_name, "kvfuse"):
            raise APIError(404, f"model: this server serves {self.engine.model_name!r}, not {body.model!r}",
                           param="model", code="model_not_found")
        question_field = "messages" if chat else "prompt"
        fusion = body.to_fusion(self.config.default_max_tokens)
        try:
            handle = await run_in_threadpool(self.engine.submit, fusion)
        except RequestError as e:
            raise from_request_error(e, question_field, body.max_tokens_field) from None
        except RuntimeError as e:  # the engine is closing
            raise APIError(503, f"the server is shutting down: {e}", code="shutting_down") from None
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + handle.request_id, "created": int(time.time()),
                "model": self.engine.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._events(handle, request, meta, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            answer = await handle
        except asyncio.CancelledError:
            handle.cancel()
            raise
        except Exception as e:
            raise APIError(500, f"the request failed in the engine: {e}", code="engine_error") from None
        self.metrics.observe(answer)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                      "finish_reason": answer.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": answer.text, "finish_reason": answer.finish_reason, "logprobs": None}
        return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": _usage(answer), "kvfuse": _kvfuse_info(answer)})

    async def _events(self, handle, request: Request, meta: dict, chat: bool, include_usage: bool):
        """SSE: a chunk per text delta (the first one carries the role), a last chunk with
        finish_reason and the kvfuse object, a usage chunk if asked, then `data: [DONE]`."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, first: bool, finish: str | None = None) -> dict:
            if chat:
                delta = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {**meta, "object": obj, "choices": [choice]}

        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, handle))
        try:
            first = True
            async for text in handle.astream():
                yield _sse(chunk(text, first))
                first = False
            try:
                answer = await handle
            except Exception as e:
                err = APIError(500, f"the request failed in the engine: {e}", code="engine_error")
                yield _sse(err.body())
                yield _sse("[DONE]")
                return
            self.metrics.observe(answer)
            yield _sse({**chunk(None, first, answer.finish_reason), "kvfuse": _kvfuse_info(answer)})
            if include_usage:
                yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(answer)})
            yield _sse("[DONE]")
        finally:
            watcher.cancel()
            if not handle.done():
                handle.cancel()

    @staticmethod
    async def _cancel_on_disconnect(request: Request, handle) -> None:
        """A client that goes away mid-stream cancels its request (the engine stops decoding it)."""
        while not handle.done():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                handle.cancel()
                return


def router(engine, api_key: str | None = None, config: ServeConfig | None = None) -> APIRouter:
    """The kvfuse routes over `engine` (a `FusionEngine`), to mount in any FastAPI app.

    api_key: require `Authorization: Bearer <api_key>` on /v1/*. config: body limit, default
    max_tokens. The router's Prometheus registry is `router.metrics.registry`."""
    config = replace(config or ServeConfig(), **({"api_key": api_key} if api_key is not None else {}))
    metrics = ServerMetrics(engine)
    route_class = type("KvfuseRoute", (_OpenAIRoute,), {"metrics": metrics})
    r = APIRouter(route_class=route_class)
    r.metrics = metrics
    complete = _Completer(engine, metrics, config)
    auth = [Depends(_key_checker(config.api_key))]

    @r.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        body = parse(ChatCompletionRequest, await read_json(request, config.max_body_bytes))
        return await complete(body, request, chat=True)

    @r.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        body = parse(CompletionRequest, await read_json(request, config.max_body_bytes))
        return await complete(body, request, chat=False)

    # plain `def`: FastAPI runs these in a worker thread, as `engine.release` may reopen the store (hot reload)
    @r.get("/v1/models", dependencies=auth)
    def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "kvfuse", "kvfuse": {"release": engine.release}}]}

    @r.get("/healthz")
    def healthz():
        return {"status": "ok", "model": engine.model_name, "release": engine.release}

    @r.get("/metrics")
    async def prometheus():
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    return r


def create_app(engine, api_key: str | None = None, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving `router(engine, api_key, config)`. The engine's lifetime stays the
    caller's (`kvfuse serve` closes it after uvicorn's graceful shutdown)."""
    app = FastAPI(title="kvfuse", version="0.1.0", description="OpenAI-compatible API over a kvfuse cache")
    kv = router(engine, api_key, config)
    app.include_router(kv)
    app.state.metrics = kv.metrics
    return app
