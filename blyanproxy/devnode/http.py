"""The HTTP face of a DevNode: one leaf resource routing every path to a small handler.

The node's Site (connections, header order) is ``devnode.site``; the WebSocket echo is
``devnode.echo``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Union

import attrs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.websocket import WebSocketResource

from blyanproxy.devnode import engines
from blyanproxy.devnode.config import SettingError, apply_knobs, parse_flag
from blyanproxy.devnode.echo import EchoFactory
from blyanproxy.devnode.gpu import prompt_words
from blyanproxy.devnode.stream import (
    PatternBody,
    TokenSchedule,
    TokenStream,
    answer_later,
    hold,
)
from blyanproxy.devnode.wire import (
    MODELS_CREATED,
    ApiError,
    ChatFormat,
    CompletionRequest,
    GenerateFormat,
    health_answer,
    injected_failure,
    json_object,
    ollama_tags,
    parse_chat_request,
    parse_generate_request,
    rfc3339,
    to_json,
)

if TYPE_CHECKING:

    from blyanproxy.devnode.config import DevNodeConfig
    from blyanproxy.devnode.node import DevNode, RequestRecord

Rendered = Union[bytes, int]  # a body, or NOT_DONE_YET

DEFAULT_BYTES = 1 << 20
"""Size of ``GET /_devnode/bytes`` without ``?size=``."""

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP header name (RFC 9110 token)


class DevNodeResource(Resource):
    """Every endpoint of one DevNode, as a leaf resource routing on the raw request path.

    Inference endpoints (``/v1/...``, ``/api/...``, ``/ws/echo``) first apply the request's knobs,
    then ``hang`` and ``fail_status``; ``/health`` and ``/_devnode/...`` never fail on purpose.
    """

    isLeaf = True

    def __init__(self, node: DevNode) -> None:
        super().__init__()
        self._node = node
        self._echo_socket = WebSocketResource(EchoFactory(node.stats))

    def render(self, request: Request) -> Rendered:
        """Count the request, route it, and answer (errors as OpenAI-shaped JSON)."""
        record = self._node.note_request(request)
        try:
            config = self._node.config
            endpoint = route(request.method, request.path, config.engine)
            path = request.path.decode("latin-1")
            if (not path.startswith("/_devnode/") and self._node.loading()
                    and not engines.answers_while_loading(config.engine, path)):
                status, body = engines.loading_answer(config.engine)
                return _json(request, body, status)
            if endpoint.inference:
                config = _request_config(config, request, record)
                if config.hang:
                    hold(request, self._node.stats)
                    return NOT_DONE_YET
                if config.fail_status is not None:
                    raise injected_failure(config.fail_status)
            return endpoint.handler(self, request, record, config)
        except ApiError as error:
            for name, value in error.headers:
                request.setHeader(name, value)
            return _json(request, error.body(), error.status)

    def _health(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        status, body = health_answer(config)
        if config.engine == engines.LLAMACPP:
            answer = _json(request, {"status": "ok"} if status < 300 else body, status)
        elif config.engine != engines.BLYAN:  # vLLM, SGLang and TGI answer with an empty body
            answer = _plain(request, b"", b"application/json", status)
        else:
            answer = _json(request, body, status)
        return self._later(request, answer, config.health_delay_ms / 1000.0)

    def _models(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return _json(request, engines.model_list(config.engine, config.models, MODELS_CREATED))

    def _metrics(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        text = engines.metrics(config.engine, config.models, self._node.load())
        return _plain(request, text.encode("utf-8"), b"text/plain; version=0.0.4; charset=utf-8")

    def _version(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return _json(request, {"version": engines.VERSIONS.get(config.engine, "0")})

    def _slots(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return _json(request, engines.slots(self._node.load()))

    def _model_info(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return _json(request, engines.model_info(config.models))

    def _info(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return _json(request, engines.info(config.models))

    def _ollama_root(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return _plain(request, b"Ollama is running", b"text/plain; charset=utf-8")

    def _running(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        expires = rfc3339(self._node.clock.seconds() + 300)
        return _json(request, engines.running_models(config.models, self._node.load(), expires))

    def _tags(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return _json(request, ollama_tags(config.models))

    def _chat(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return self._complete(request, record, config, parse_chat_request(record.body, config.models), ChatFormat)

    def _generate(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return self._complete(
            request, record, config, parse_generate_request(record.body, config.models), GenerateFormat
        )

    def _complete(
        self,
        request: Request,
        record: RequestRecord,
        config: DevNodeConfig,
        completion: CompletionRequest,
        wire: type[ChatFormat] | type[GenerateFormat],
    ) -> Rendered:
        """Generate once the GPU has a slot (``devnode.gpu``): at once, or later from its queue."""
        gpu = self._node.gpu
        answered: list[Rendered] = []

        def start() -> None:
            uncached = gpu.prefill(prompt_words(record.body), config.prefix_cache_blocks)
            timed = attrs.evolve(config, ttft_ms=config.ttft_ms + config.prompt_token_ms * uncached)
            rendered = self._generate_now(request, timed, completion, wire)
            if answered:  # started from the queue: the request already returned NOT_DONE_YET
                if rendered is not NOT_DONE_YET:
                    request.write(rendered)
                    request.finish()
            else:
                answered.append(rendered)

        started = [False]

        def ended(_: object) -> None:
            if started[0]:
                gpu.release(config.max_num_seqs)
            else:
                leave()

        def admitted() -> None:
            started[0] = True
            start()

        request.notifyFinish().addBoth(ended)
        leave = gpu.admit(config.max_num_seqs, admitted)
        if answered:
            return answered[0]
        answered.append(NOT_DONE_YET)
        return NOT_DONE_YET

    def _generate_now(
        self,
        request: Request,
        config: DevNodeConfig,
        completion: CompletionRequest,
        wire: type[ChatFormat] | type[GenerateFormat],
    ) -> Rendered:
        clock = self._node.clock
        fmt = wire.create(completion, config, clock.seconds())
        schedule = TokenSchedule.for_config(config, fmt.count)
        if completion.stream:
            TokenStream(request, clock, schedule, fmt, self._node.stats, config.close_after).start()
            return NOT_DONE_YET
        return self._later(request, _json(request, fmt.whole()), schedule.duration)

    def _websocket(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return self._echo_socket.render(request)

    def _echo(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        for line in request.requestHeaders.getRawHeaders(b"x-devnode-set-header", []):
            request.responseHeaders.addRawHeader(*_set_header(line))
        client = getattr(request.getClientAddress(), "host", None)
        return _json(request, {**record.as_json(), "client": client})

    def _bytes(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        size = _size(_query(request, b"size"))
        try:
            chunked = parse_flag(_query(request, b"chunked") or "")
        except ValueError as error:
            raise ApiError(400, f"chunked: {error}", "invalid_chunked") from None
        request.setHeader(b"content-type", b"application/octet-stream")
        if not chunked:
            request.setHeader(b"content-length", b"%d" % size)
        PatternBody(request, size, self._node.stats).start()
        return NOT_DONE_YET

    def _stats(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        return _json(request, self._node.stats.as_json())

    def _config(self, request: Request, record: RequestRecord, config: DevNodeConfig) -> Rendered:
        if request.method == b"POST":
            try:
                self._node.configure(**json_object(record.body))
            except (TypeError, ValueError) as error:
                raise ApiError(400, str(error), "invalid_config") from None
        return _json(request, attrs.asdict(self._node.config))

    def _later(self, request: Request, body: bytes, delay: float) -> Rendered:
        """``body`` now, or after ``delay`` seconds on the node's clock."""
        if delay <= 0:
            return body
        answer_later(request, self._node.clock, delay, body)
        return NOT_DONE_YET


Handler = Callable[[DevNodeResource, Request, "RequestRecord", "DevNodeConfig"], Rendered]


@attrs.frozen
class Endpoint:
    """A route's target: the methods it answers (empty: any), its handler, and whether it is an
    inference endpoint (knobs and failure injection apply)."""

    methods: tuple[bytes, ...]
    handler: Handler
    inference: bool = False


_GET = (b"GET", b"HEAD")  # twisted.web sends no body for HEAD
_POST = (b"POST",)
_ENDPOINTS = {
    b"/health": Endpoint(_GET, DevNodeResource._health),
    b"/health_generate": Endpoint(_GET, DevNodeResource._health),
    b"/metrics": Endpoint(_GET, DevNodeResource._metrics),
    b"/version": Endpoint(_GET, DevNodeResource._version),
    b"/api/version": Endpoint(_GET, DevNodeResource._version),
    b"/slots": Endpoint(_GET, DevNodeResource._slots),
    b"/get_model_info": Endpoint(_GET, DevNodeResource._model_info),
    b"/info": Endpoint(_GET, DevNodeResource._info),
    b"/": Endpoint(_GET, DevNodeResource._ollama_root),
    b"/api/ps": Endpoint(_GET, DevNodeResource._running),
    b"/v1/models": Endpoint(_GET, DevNodeResource._models, inference=True),
    b"/v1/chat/completions": Endpoint(_POST, DevNodeResource._chat, inference=True),
    b"/api/generate": Endpoint(_POST, DevNodeResource._generate, inference=True),
    b"/api/tags": Endpoint(_GET, DevNodeResource._tags, inference=True),
    b"/ws/echo": Endpoint((b"GET",), DevNodeResource._websocket, inference=True),
    b"/_devnode/bytes": Endpoint(_GET, DevNodeResource._bytes),
    b"/_devnode/stats": Endpoint(_GET, DevNodeResource._stats),
    b"/_devnode/config": Endpoint(_GET + _POST, DevNodeResource._config),
}
_ECHO = Endpoint((), DevNodeResource._echo)


#: Paths every engine serves: OpenAI's chat completions, the WebSocket echo and the diagnostics.
_COMMON = frozenset({"/v1/chat/completions", "/ws/echo", "/_devnode/bytes", "/_devnode/stats", "/_devnode/config"})


def route(method: bytes, path: bytes, engine: str = engines.BLYAN) -> Endpoint:
    """The endpoint for a raw request path on a node speaking like ``engine``; ApiError 404 (a path
    that engine does not serve) or 405 (wrong method)."""
    endpoint = (
        _ECHO if path == b"/_devnode/echo" or path.startswith(b"/_devnode/echo/") else _ENDPOINTS.get(path)
    )
    text = path.decode("latin-1")
    if endpoint is not _ECHO and text not in _COMMON and text not in engines.PATHS[engine]:
        endpoint = None
    if endpoint is None:
        raise ApiError(404, f"no such endpoint: {path.decode('latin-1')}", "not_found")
    if endpoint.methods and method not in endpoint.methods:
        allow = ((b"Allow", b", ".join(endpoint.methods)),)
        raise ApiError(
            405, f"{method.decode('latin-1')} is not allowed here", "method_not_allowed", headers=allow
        )
    return endpoint


def _request_config(config: DevNodeConfig, request: Request, record: RequestRecord) -> DevNodeConfig:
    """The node's config overridden by the request's knobs; ApiError 400 naming a bad knob."""
    try:
        return apply_knobs(config, record.headers, request.args)
    except SettingError as error:
        raise ApiError(400, f"bad devnode knob {error}", "invalid_knob") from None


def _json(request: Request, value: object, status: int = 200) -> bytes:
    """Set the status and JSON content type; return ``value`` as JSON bytes."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return to_json(value)


def _plain(request: Request, body: bytes, content_type: bytes, status: int = 200) -> bytes:
    """Set the status and content type; return ``body`` as it is."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    return body


def _query(request: Request, name: bytes) -> str | None:
    """The last value of a query parameter, or None."""
    values = request.args.get(name)
    return values[-1].decode("latin-1") if values else None


def _size(text: str | None) -> int:
    """The ``size`` of ``/_devnode/bytes``: a non-negative integer, DEFAULT_BYTES if absent."""
    if text is None:
        return DEFAULT_BYTES
    if not text.isdigit():
        raise ApiError(400, f"size must be a non-negative integer, not {text!r}", "invalid_size")
    return int(text)


def _set_header(line: bytes) -> tuple[bytes, bytes]:
    """Split one ``X-Devnode-Set-Header: Name: value`` instruction into name and value."""
    name, colon, value = line.partition(b":")
    name = name.strip()
    if not colon or not _TOKEN.fullmatch(name):
        raise ApiError(
            400, f"X-Devnode-Set-Header must read 'Name: value', not {line!r}", "invalid_set_header"
        )
    return name, value.strip()
