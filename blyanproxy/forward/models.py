"""The model list the proxy answers itself: ``GET /v1/models``, ``/v1/models/{id}`` and Ollama's ``/api/tags``.

Each model is listed once, and only when a usable node of the pool serves it
(declared, or learned by the health checks); a model's ``owned_by`` is the
engine of its first node. ``/api/tags`` is answered in Ollama's shape when the
pool has an Ollama node. A pool none of whose usable nodes has a known model
list (say, one API key's workloads, which nobody probes) is not answered here:
the request goes to a node as before. The lists are pure functions of the
pool's ``listing``; ``answer_models`` is the glue the forwarding resource calls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from urllib.parse import unquote_to_bytes

import attrs

from blyanproxy.core import OLLAMA, Node, NodeStats, ProxyError, Route, engine_of, model_not_found, served_models
from blyanproxy.core import write_error as write_proxy_error
from blyanproxy.fleet import LeasePool
from blyanproxy.forward import traffic

_MODELS = b"/v1/models"
_TAGS = b"/api/tags"


@attrs.frozen
class ServedModel:
    """One model of the list: its id, the engine of its first node, and when that node was added."""

    id: str
    owned_by: str
    created: int

    def as_openai(self) -> dict:
        """OpenAI's model object."""
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}

    def as_ollama(self) -> dict:
        """An entry of Ollama's ``/api/tags``."""
        modified = datetime.fromtimestamp(self.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"name": self.id, "model": self.id, "modified_at": modified, "size": 0, "digest": "", "details": {}}


def served(entries: Sequence[tuple[Node, NodeStats]]) -> list[ServedModel] | None:
    """The models the usable ``entries`` serve, each once in node order; ``None`` when no node's list is known."""
    models: dict[str, ServedModel] = {}
    known = False
    for node, stats in entries:
        names = served_models(node.models, stats.models)
        if names is None:
            continue
        known = True
        owner = engine_of(node.engine, stats.engine) or "blyan-proxy"
        for name in names:
            models.setdefault(name, ServedModel(name, owner, int(node.added_at)))
    return list(models.values()) if known else None


def wanted(route: Route, method: bytes) -> bytes | None:
    """Which list a request asks for (``/v1/models``, ``/v1/models/{id}`` or ``/api/tags``), or ``None``."""
    if method != b"GET":
        return None
    path = route.client_path
    if path == _MODELS or path.startswith(_MODELS + b"/") or path == _TAGS:
        return path
    return None


def body_for(path: bytes, entries: Sequence[tuple[Node, NodeStats]]) -> dict | None:
    """The JSON answer for ``path`` (see ``wanted``), ``None`` to let a node answer; 404 ``ProxyError``
    for a model id no usable node serves."""
    models = served(entries)
    if models is None:
        return None
    if path == _TAGS:
        if not any(engine_of(node.engine, stats.engine) == OLLAMA for node, stats in entries):
            return None
        return {"models": [model.as_ollama() for model in models]}
    if path == _MODELS:
        return {"object": "list", "data": [model.as_openai() for model in models]}
    model_id = unquote_to_bytes(path[len(_MODELS) + 1:]).decode("utf-8", "replace")
    for model in models:
        if model.id == model_id:
            return model.as_openai()
    raise model_not_found(model_id)


def answer_models(request, tally: traffic.RequestTally, route: Route, pool: LeasePool) -> bool:
    """Answer a model-list request from ``pool``'s usable nodes; False when it is not one the proxy answers."""
    path = wanted(route, request.method)
    if path is None:
        return False
    try:
        document = body_for(path, pool.listing(route))
    except ProxyError as err:
        write_proxy_error(request, err)
        tally.end(err.status, traffic.ERROR)
        return True
    if document is None:
        return False
    body = json.dumps(document).encode("utf-8")
    request.setResponseCode(200)
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()
    tally.bytes_out = len(body)
    tally.end(200, traffic.COMPLETE)
    return True
