"""The proxy's HTTP/1.1 client to nodes: head parsing, pooled connections, endpoints and TLS trust."""

from __future__ import annotations

from blyanproxy.upstream.bodies import BodyTooLarge, read_capped
from blyanproxy.upstream.client import BodyReceiver, UpstreamConnection, UpstreamPool
from blyanproxy.upstream.connecting import connect_quietly
from blyanproxy.upstream.endpoints import NodeEndpoints, NodeTLSPolicy, load_trust_root
from blyanproxy.upstream.http11 import (
    ProtocolError,
    body_framing,
    parse_head,
    serialize_request_head,
    serialize_response_head,
)
from blyanproxy.upstream.sweeper import UpstreamPoolService
from blyanproxy.upstream.writethrough import write_through

__all__ = [
    "BodyReceiver",
    "BodyTooLarge",
    "NodeEndpoints",
    "NodeTLSPolicy",
    "ProtocolError",
    "UpstreamConnection",
    "UpstreamPool",
    "UpstreamPoolService",
    "body_framing",
    "connect_quietly",
    "load_trust_root",
    "parse_head",
    "read_capped",
    "serialize_request_head",
    "serialize_response_head",
    "write_through",
]
