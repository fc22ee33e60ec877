"""An OpenAI-compatible HTTP endpoint on the same engine: /v1/models,
/v1/completions and /v1/chat/completions, with `stream: true` as server-sent events.

Enough of the API for the OpenAI SDKs and the tools built on them: model,
prompt or messages, max_tokens, temperature, top_p, seed, stop, stream; usage
counts. A GatewayError is answered as `{"error": {"message", "type", "code"}}`
with its HTTP status — 400 bad request, 404 unknown model, 413 body too large,
429 at capacity, 502 remote server failed, 503 engine restarting (with
`Retry-After`), 500 generation failed — or, once an event stream has begun,
as its last event (`data: {"error": ...}`, which the OpenAI SDKs raise).
Chat messages are rendered as "role: content" lines ending with
"assistant:" — the models trained here have no chat template.

/v1/models says of each model its version, the precision it is served at and
why, and `task_eval`: the run's eval-set figures (exact match, macro-F1) per set
of weights scored, "served" naming those answering (null without an eval set).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from aiohttp import web

from services.inference_gateway.engines.base import Piece
from services.inference_gateway.errors import (
    GatewayError,
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
)
from services.inference_gateway.frontend import GenerationFrontend, GenerationRequest, counted

PROTOCOL = "openai"
log = logging.getLogger("lmforge.gateway.openai")


def error_body(error: GatewayError) -> dict[str, object]:
    return {"error": {"message": error.message, "type": error.openai_type,
                      "code": error.openai_code}}


def error_response(error: GatewayError) -> web.Response:
    """The error as an OpenAI error body with its HTTP status (and Retry-After)."""
    headers = ({"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None
               else None)
    return web.json_response(error_body(error), status=error.http_status, headers=headers)


def render_chat(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content}")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise InvalidRequest("each message needs role system|user|assistant and a "
                                 "string content")
        lines.append(f"{m['role']}: {m['content']}")
    return "\n".join(lines) + "\nassistant:"


def _given(body: Mapping[str, object], names: tuple[str, ...]
           ) -> tuple[str, int | float] | None:
    """The first of `names` present and not null, with its value."""
    for name in names:
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"{name} must be a number, got {value!r}")
            return name, value
    return None


def _integer(body: Mapping[str, object], names: tuple[str, ...], default: int) -> int:
    """An integer field (JSON 2 and 2.0 alike); 1.5, 1e400 (infinity) and NaN are refused.
    Its range is checked by the frontend, the same for every protocol."""
    given = _given(body, names)
    if given is None:
        return default
    name, value = given
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidRequest(f"{name} must be an integer, got {value!r}")
        return int(value)
    return value


def _real(body: Mapping[str, object], name: str, default: float) -> float:
    """A real-valued field; one too large for a double (10**400) is refused here, NaN and
    infinity by the frontend's range checks."""
    given = _given(body, (name,))
    if given is None:
        return default
    try:
        return float(given[1])
    except OverflowError:
        raise InvalidRequest(f"{name} {given[1]} is out of range") from None


def parse_body(body: Mapping[str, object], *, chat: bool) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required")
    if chat:
        prompt = render_chat(body.get("messages"))
    else:
        given = body.get("prompt")
        if isinstance(given, list) and len(given) == 1:
            given = given[0]
        if not isinstance(given, str):
            raise InvalidRequest("prompt must be a string (one prompt per request)")
        prompt = given
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a string or a list of strings")
    max_tokens = _integer(body, ("max_tokens", "max_completion_tokens"), 16)
    temperature = _real(body, "temperature", 1.0)
    top_p = _real(body, "top_p", 1.0)
    seed = _integer(body, ("seed",), 0)
    top_k = _integer(body, ("top_k",), 0)  # an extension many servers accept
    if max_tokens <= 0:
        raise InvalidRequest(f"max_tokens {max_tokens} must be positive")
    if "top_p" in body and body["top_p"] is not None and not 0 < top_p <= 1:
        # An explicit 0 used to be served as 1.0 (the native message's "unset"): the
        # opposite of what the client asked for.
        raise InvalidRequest(f"top_p {top_p} must be in (0, 1]; for greedy decoding set "
                             "temperature 0")
    if _integer(body, ("n",), 1) != 1:
        raise InvalidRequest("n must be 1: this server returns one choice per request")
    return GenerationRequest(model=model, prompt=prompt, max_new_tokens=max_tokens,
                             temperature=temperature, top_p=top_p, seed=seed,
                             top_k=top_k, stop=tuple(stop))


def _finish(piece: Piece) -> str:
    """OpenAI's finish_reason: "length", or "stop" for every other end."""
    return "length" if piece.finish_reason == "length" else "stop"


def _usage(last: Piece) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def _event(data: Mapping[str, object]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


class OpenAIServer:
    def __init__(self, frontend: GenerationFrontend, *, host: str, port: int,
                 max_body_bytes: int, middlewares: Iterable[Any] = (),
                 ssl_context: ssl.SSLContext | None = None,
                 body_timeout_s: float = 30.0) -> None:
        """`middlewares`: the API-key guard (api/guard.py); `ssl_context`: HTTPS;
        `body_timeout_s`: how long a request body may take to arrive (a client that
        trickles it, slowloris, is answered 408 instead of holding a connection open)."""
        self.frontend = frontend
        self.host, self.port = host, port
        self.max_body_bytes = max_body_bytes
        self.ssl_context = ssl_context
        self.body_timeout_s = body_timeout_s
        self.app = web.Application(client_max_size=max_body_bytes,
                                   middlewares=list(middlewares))
        self.app.add_routes([web.get("/v1/models", self.models),
                             web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat)])
        self.runner: web.AppRunner | None = None

    async def start(self) -> int:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_port=True,
                           ssl_context=self.ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        registry = self.frontend.registry
        data = []
        for name in registry.names():
            precision, reason = registry.precision(name)
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "lmforge",
                         "version": registry.version(name), "precision": precision,
                         "precision_reason": reason,
                         "task_eval": registry.task_eval(name) or None})
        return web.json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _body(self, request: web.Request) -> dict[str, object]:
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout_s)
            body = json.loads(raw)
        except TimeoutError:
            raise RequestTimeout(f"request body not received within {self.body_timeout_s:g}s"
                                 ) from None
        except web.HTTPRequestEntityTooLarge:
            raise RequestTooLarge(f"request body over {self.max_body_bytes} bytes "
                                  "(LMFORGE_GATEWAY_MAX_MESSAGE_BYTES)") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidRequest("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object")
        return body

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            return await self._answer(request, chat=chat)
        except ConnectionResetError:
            # The client went away mid-answer (an event-stream reader that stopped early):
            # nobody to tell. Its generation was cancelled and counted CANCELLED; one line
            # here, not aiohttp's traceback at error level.
            log.info("client %s closed the connection before the answer to %s was complete",
                     request.remote, request.path)
            return web.Response(status=499)  # never sent: the connection is gone

    async def _answer(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        # Sent only for `stream: true`, and only once the first piece is in: a request
        # refused before it gets an error status, not an event stream.
        events = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                             "Cache-Control": "no-cache"})
        cancelled = threading.Event()
        try:
            with counted(PROTOCOL) as outcome:
                body = await self._body(request)
                model = body.get("model")
                outcome.model = model if isinstance(model, str) else ""
                wanted = parse_body(body, chat=chat)
                stream = self.frontend.stream(wanted, cancelled)
                try:
                    first = await anext(stream, None)
                    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
                    if body.get("stream"):
                        await events.prepare(request)
                        await self._send_events(events, stream, first, ident, wanted.model,
                                                chat)
                        return events
                    pieces = [first] if first else []
                    pieces += [p async for p in stream]
                    return web.json_response(self._whole(pieces, ident, wanted.model, chat))
                finally:
                    cancelled.set()
                    await stream.aclose()
        except GatewayError as exc:
            if not events.prepared:
                return error_response(exc)
            await events.write(_event(error_body(exc)))  # the stream's last event
            await events.write_eof()
            return events

    @staticmethod
    def _whole(pieces: list[Piece], ident: str, model: str, chat: bool) -> dict[str, object]:
        text = "".join(p.text for p in pieces)
        last = pieces[-1]
        choice: dict[str, object] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": _finish(last)} if chat else
            {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(last)})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": [choice],
                "usage": _usage(last)}

    @staticmethod
    async def _send_events(events: web.StreamResponse, stream: AsyncIterator[Piece],
                           first: Piece | None, ident: str, model: str, chat: bool) -> None:
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(choice: dict[str, object]) -> dict[str, object]:
            return {"id": ident, "object": kind, "created": created, "model": model,
                    "choices": [choice]}

        async def send(piece: Piece) -> None:
            finish = _finish(piece) if piece.finish_reason else None
            choice: dict[str, object]
            if chat:
                choice = {"index": 0, "delta": {"content": piece.text}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece.text, "logprobs": None,
                          "finish_reason": finish}
            data = chunk(choice)
            if finish:
                data["usage"] = _usage(piece)
            await events.write(_event(data))

        if chat:
            await events.write(_event(chunk({"index": 0, "delta": {"role": "assistant"},
                                             "finish_reason": None})))
        if first is not None:
            await send(first)
        async for piece in stream:
            await send(piece)
        await events.write(b"data: [DONE]\n\n")
        await events.write_eof()
