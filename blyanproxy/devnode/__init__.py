"""A simulated GPU inference node: a real HTTP server that talks like an LLM server.

It serves OpenAI chat completions (JSON or SSE), ``/v1/models``, Ollama ``/api/generate`` and
``/api/tags``, ``/health``, a WebSocket echo at ``/ws/echo`` and diagnostics under ``/_devnode/``,
with its pace (time to first token, tokens per second) and failures set by a DevNodeConfig,
changeable at runtime and per request. The proxy's demo mode, its tests and benchmarks use it::

    node, port = listen_devnode(reactor, DevNodeConfig(tokens_per_second=20))
    node.configure(health_status=503)      # or POST /_devnode/config {"health_status": 503}
    node.stats.streams_aborted             # or GET /_devnode/stats

Without sockets, ``treq.testing.StubTreq(node.resource())`` serves it in memory.
"""

from blyanproxy.devnode.config import MAX_TOKENS_CAP, DevNodeConfig
from blyanproxy.devnode.node import DevNode, DevNodeStats, RequestRecord, listen_devnode

__all__ = [
    "MAX_TOKENS_CAP",
    "DevNode",
    "DevNodeConfig",
    "DevNodeStats",
    "RequestRecord",
    "listen_devnode",
]
