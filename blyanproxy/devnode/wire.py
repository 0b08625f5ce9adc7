"""What a simulated node says: OpenAI and Ollama request checks and response shapes, SSE and
NDJSON framing, and errors as values. Pure: no clock, no I/O (ids come from ``secrets``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import attrs

from blyanproxy.devnode.config import MAX_TOKENS_CAP, DevNodeConfig

if TYPE_CHECKING:
    from typing_extensions import Self

MODELS_CREATED = 1_700_000_000
"""The ``created`` time reported for every simulated model (fixed, so answers are reproducible)."""

_WORDS = ("Hello", "from", "the", "simulated", "GPU", "node.")


@attrs.frozen
class ApiError(Exception):
    """An error answer: HTTP status, OpenAI's error fields and any extra response headers."""

    status: int
    message: str
    code: str | int
    type: str = "invalid_request_error"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> dict:
        """The OpenAI error object: ``{"error": {"message", "type", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def injected_failure(status: int) -> ApiError:
    """The answer of a node told to fail with ``status`` (a 503 also says ``Retry-After: 1``)."""
    headers = ((b"Retry-After", b"1"),) if status == 503 else ()
    return ApiError(status, "injected failure", status, type="server_error", headers=headers)


def to_json(value: object) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def sse_event(data: bytes) -> bytes:
    """One server-sent event carrying ``data`` (which must not contain a newline)."""
    return b"data: " + data + b"\n\n"


def ndjson_line(value: object) -> bytes:
    """One newline-delimited JSON record."""
    return to_json(value) + b"\n"


def rfc3339(seconds: float) -> str:
    """A POSIX time as Ollama prints it, e.g. ``2023-11-14T22:13:20.000000Z``."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def token_text(index: int) -> str:
    """The text of token ``index`` of every simulated completion (words, space-separated)."""
    word = _WORDS[index % len(_WORDS)]
    return word if index == 0 else " " + word


def completion_text(count: int) -> str:
    """The whole text of a completion of ``count`` tokens."""
    return "".join(token_text(index) for index in range(count))


def health_answer(config: DevNodeConfig) -> tuple[int, dict]:
    """Status and body of ``GET /health`` for ``config``."""
    healthy = 200 <= config.health_status < 300
    body = {"status": "ok" if healthy else "unhealthy", "node": config.name, "model_ready": healthy}
    return config.health_status, body


def ollama_tags(models: Sequence[str]) -> dict:
    """The Ollama ``GET /api/tags`` list."""
    details = {"format": "gguf", "family": "blyan-sim", "parameter_size": "7B", "quantization_level": "Q4_0"}
    return {
        "models": [
            {
                "name": m,
                "model": m,
                "modified_at": rfc3339(MODELS_CREATED),
                "size": 0,
                "digest": hashlib.sha256(m.encode("utf-8")).hexdigest(),
                "details": details,
            }
            for m in models
        ]
    }


@attrs.frozen
class CompletionRequest:
    """A checked request for a generation, whichever API it came through."""

    model: str
    stream: bool
    prompt_tokens: int
    max_tokens: int | None = None  # what the request asked for; None: the node's default length
    include_usage: bool = False

    def length(self, config: DevNodeConfig) -> tuple[int, str]:
        """How many tokens to generate, and the finish reason: ``length`` when the request's limit
        ended the completion, ``stop`` when the node's default length did."""
        if self.max_tokens is None:
            return config.max_tokens, "stop"
        return min(self.max_tokens, MAX_TOKENS_CAP), "length"


def parse_chat_request(body: bytes, models: Sequence[str]) -> CompletionRequest:
    """Check a ``POST /v1/chat/completions`` body; ApiError (400, or 404 for a model) if it is bad."""
    request = json_object(body)
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages")
    options = request.get("stream_options")
    return CompletionRequest(
        model=_model(request, models),
        stream=_flag(request, "stream", default=False),
        prompt_tokens=sum(_word_count(m.get("content")) for m in messages if isinstance(m, dict)),
        max_tokens=_limit(request, "max_completion_tokens") or _limit(request, "max_tokens"),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


def parse_generate_request(body: bytes, models: Sequence[str]) -> CompletionRequest:
    """Check an Ollama ``POST /api/generate`` body (``stream`` defaults to true, the length limit is
    ``options.num_predict``); ApiError if it is bad."""
    request = json_object(body)
    prompt = request.get("prompt", "")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string", "invalid_prompt")
    options = request.get("options")
    return CompletionRequest(
        model=_model(request, models),
        stream=_flag(request, "stream", default=True),
        prompt_tokens=_word_count(prompt),
        max_tokens=_limit(options if isinstance(options, dict) else {}, "num_predict"),
    )


def json_object(body: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        value = json.loads(body)
    except ValueError as error:  # UnicodeDecodeError is a ValueError too
        raise ApiError(400, f"request body is not valid JSON: {error}", "invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    return value


def _model(request: dict, models: Sequence[str]) -> str:
    """The model asked for, one the node serves; the first one when the request names none."""
    model = request.get("model")
    if model is None:
        return models[0]
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "invalid_model")
    if model not in models:
        raise ApiError(404, f"The model '{model}' does not exist", "model_not_found")
    return model


def _flag(request: dict, key: str, default: bool) -> bool:
    """A boolean field; absent or null means ``default``."""
    value = request.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false", "invalid_" + key)
    return value


def _limit(request: dict, key: str) -> int | None:
    """A token limit field: a positive integer, or None when absent or null."""
    value = request.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"'{key}' must be a positive integer", "invalid_" + key)
    return value


def _word_count(content: object) -> int:
    """A rough token count: words in a string, or in the text parts of a multi-part content list."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_word_count(part.get("text")) for part in content if isinstance(part, dict))
    return 0


@attrs.frozen
class Generation:
    """One generation, known before its first token: what was asked, how long it is, when it began.

    Subclasses render it in one wire format; ``content_type`` is that of a streamed answer.
    """

    request: CompletionRequest
    count: int
    finish_reason: str
    created: float
    id: str

    @classmethod
    def create(cls, request: CompletionRequest, config: DevNodeConfig, now: float) -> Self:
        """The generation ``config`` makes for ``request``, starting at ``now`` (POSIX seconds)."""
        count, finish_reason = request.length(config)
        return cls(request, count, finish_reason, now, secrets.token_hex(12))

    def usage(self) -> dict:
        """OpenAI's token accounting."""
        prompt = self.request.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": self.count, "total_tokens": prompt + self.count}


@attrs.frozen
class ChatFormat(Generation):
    """OpenAI chat completions: ``chat.completion.chunk`` SSE events, or one ``chat.completion``."""

    content_type = b"text/event-stream"

    def token(self, index: int) -> bytes:
        """The SSE event of token ``index``; the first one also carries the assistant role."""
        delta = (
            {"role": "assistant", "content": token_text(index)}
            if index == 0
            else {"content": token_text(index)}
        )
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": None}])

    def end(self) -> bytes:
        """The events after the last token: an empty delta with the finish reason, the usage chunk
        if the request asked for it (``stream_options.include_usage``), then ``[DONE]``."""
        events = self._chunk([{"index": 0, "delta": {}, "finish_reason": self.finish_reason}])
        if self.request.include_usage:
            events += self._chunk([], usage=self.usage())
        return events + sse_event(b"[DONE]")

    def whole(self) -> dict:
        """The non-streamed ``chat.completion`` object."""
        message = {"role": "assistant", "content": completion_text(self.count)}
        return {
            **self._envelope("chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
            "usage": self.usage(),
        }

    def _chunk(self, choices: list, **extra: object) -> bytes:
        return sse_event(to_json({**self._envelope("chat.completion.chunk"), "choices": choices, **extra}))

    def _envelope(self, kind: str) -> dict:
        return {
            "id": "chatcmpl-" + self.id,
            "object": kind,
            "created": int(self.created),
            "model": self.request.model,
        }


@attrs.frozen
class GenerateFormat(Generation):
    """Ollama ``/api/generate``: one NDJSON record per token then a ``done`` one, or a single object."""

    content_type = b"application/x-ndjson"

    def token(self, index: int) -> bytes:
        """The NDJSON record of token ``index``."""
        return ndjson_line({**self._envelope(), "response": token_text(index), "done": False})

    def end(self) -> bytes:
        """The final ``done`` record."""
        return ndjson_line(self._done(""))

    def whole(self) -> dict:
        """The non-streamed answer: the ``done`` record carrying the whole text."""
        return self._done(completion_text(self.count))

    def _done(self, response: str) -> dict:
        return {
            **self._envelope(),
            "response": response,
            "done": True,
            "done_reason": self.finish_reason,
            "prompt_eval_count": self.request.prompt_tokens,
            "eval_count": self.count,
        }

    def _envelope(self) -> dict:
        return {"model": self.request.model, "created_at": rfc3339(self.created)}
