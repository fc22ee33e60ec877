"""An OpenAI-compatible HTTP endpoint on the same engine: /v1/models,
/v1/completions and /v1/chat/completions, with `stream: true` as server-sent events.

Enough of the API for the OpenAI SDKs and the tools built on them: model,
prompt or messages, max_tokens, temperature, top_p, seed, stop, stream; usage
counts; errors as `{"error": {"message", "type", "code"}}` with 400 (bad
request), 404 (unknown model), 413 (body too large), 429 (at capacity).
Chat messages are rendered as "role: content" lines ending with
"assistant:" — the models trained here have no chat template.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

from aiohttp import web

from services.inference_gateway.engines.torch import RequestError
from services.inference_gateway.frontend import (
    CapacityError,
    GenerationFrontend,
    GenerationRequest,
)
from services.inference_gateway.registry import UnknownModelError


def _error(status: int, message: str, kind: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": code}},
                             status=status)


def render_chat(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise RequestError("each message needs role system|user|assistant and a "
                               "string content")
        lines.append(f"{m['role']}: {m['content']}")
    return "\n".join(lines) + "\nassistant:"


def _number(body: dict, names: tuple[str, ...], default, kind):
    """The first of `names` present and not null, as `kind`; else the default."""
    for name in names:
        if body.get(name) is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"{name} must be a number, got {value!r}")
            return kind(value)
    return default


def parse_body(body: dict, *, chat: bool) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model is required")
    if chat:
        prompt = render_chat(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request)")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of strings")
    try:
        max_tokens = _number(body, ("max_tokens", "max_completion_tokens"), 16, int)
        temperature = _number(body, ("temperature",), 1.0, float)
        top_p = _number(body, ("top_p",), 1.0, float)
        seed = _number(body, ("seed",), 0, int)
        top_k = _number(body, ("top_k",), 0, int)  # an extension many servers accept
    except (TypeError, ValueError) as exc:
        raise RequestError(f"bad numeric field: {exc}") from None
    if max_tokens <= 0:
        raise RequestError(f"max_tokens {max_tokens} must be positive")
    if seed < 0:
        raise RequestError(f"seed {seed} must be >= 0")
    return GenerationRequest(model=model, prompt=prompt, max_new_tokens=max_tokens,
                             temperature=temperature, top_p=top_p, seed=seed,
                             top_k=top_k, stop=tuple(stop))


class OpenAIServer:
    def __init__(self, frontend: GenerationFrontend, *, host: str, port: int,
                 max_body_bytes: int) -> None:
        self.frontend = frontend
        self.host, self.port = host, port
        self.max_body_bytes = max_body_bytes
        self.app = web.Application(client_max_size=max_body_bytes)
        self.app.add_routes([web.get("/v1/models", self.models),
                             web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat)])
        self.runner: web.AppRunner | None = None

    async def start(self) -> int:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_port=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        registry = self.frontend.registry
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "lmforge",
             "version": registry.version(name)} for name in registry.names()]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body over {self.max_body_bytes} bytes "
                          "(LMFORGE_GATEWAY_MAX_MESSAGE_BYTES)", "invalid_request_error",
                          "request_too_large")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "body is not valid JSON", "invalid_request_error", "bad_json")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object", "invalid_request_error",
                          "bad_json")
        try:
            wanted = parse_body(body, chat=chat)
        except RequestError as exc:
            return _error(400, str(exc), "invalid_request_error", "invalid_value")
        cancelled = threading.Event()
        stream = self.frontend.stream(wanted, cancelled)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        except RequestError as exc:
            return _error(400, str(exc), "invalid_request_error", "invalid_value")
        except UnknownModelError as exc:
            return _error(404, str(exc.args[0]), "invalid_request_error", "model_not_found")
        except CapacityError as exc:
            return _error(429, str(exc), "rate_limit_error", "at_capacity")
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            if body.get("stream"):
                return await self._sse(request, stream, first, ident, created, wanted, chat)
            pieces = [first] if first else []
            pieces += [p async for p in stream]
            return web.json_response(self._whole(pieces, ident, created, wanted, chat))
        finally:
            cancelled.set()
            await stream.aclose()

    @staticmethod
    def _usage(last) -> dict:
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens}

    def _whole(self, pieces, ident, created, wanted, chat) -> dict:
        text = "".join(p.text for p in pieces)
        last = pieces[-1]
        finish = "length" if last.finish_reason == "length" else "stop"
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": wanted.model, "choices": [choice],
                "usage": self._usage(last)}

    async def _sse(self, request, stream, first, ident, created, wanted, chat):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(piece) -> None:
            finish = None
            if piece.finish_reason:
                finish = "length" if piece.finish_reason == "length" else "stop"
            if chat:
                choice = {"index": 0, "delta": {"content": piece.text}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece.text, "logprobs": None,
                          "finish_reason": finish}
            chunk = {"id": ident, "object": kind, "created": created, "model": wanted.model,
                     "choices": [choice]}
            if finish:
                chunk["usage"] = self._usage(piece)
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        if chat:
            await response.write(("data: " + json.dumps({
                "id": ident, "object": kind, "created": created, "model": wanted.model,
                "choices": [{"index": 0, "delta": {"role": "assistant"},
                             "finish_reason": None}]}) + "\n\n").encode())
        if first is not None:
            await send(first)
        async for piece in stream:
            await send(piece)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
