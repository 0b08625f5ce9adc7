"""Pure decisions about which headers cross the proxy, in each direction.

Headers travel as ``(name, [values])`` pairs of bytes, the shape of
``twisted.web.http_headers.Headers.getAllRawHeaders()``: repeats stay repeats.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import attrs

from blyanproxy.core.requestview import RequestView
from blyanproxy.core.trust import ForwardTrust, origin_address

RawHeaders = list[tuple[bytes, list[bytes]]]

#: Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones the client library frames itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"host",
    }
)
#: Headers a client may only set when the proxy trusts its peer to have set them.
_FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)
_BLYAN_RESPONSE = frozenset({b"x-blyan-node", b"x-blyan-attempts"})
#: The proxy's own credentials (the admin and metrics token): never a node's business.
_PROXY_CREDENTIALS = frozenset({b"x-admin-token"})
#: Control characters but horizontal tab: no header value may hold one (RFC 9110 §5.5).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def unfit_request_headers(headers: Iterable[tuple[bytes, Sequence[bytes]]]) -> list[bytes]:
    """The names of headers with a value holding a control character (tab aside), in order.

    twisted.web refuses NUL, CR and LF itself but lets the others through; a
    request carrying one is refused (``serve.ProxyRequest``), since a header
    dropped silently could change what the request means to the node.
    """
    received = list(headers)
    if not _CONTROL.search(b"\t".join([value for _, values in received for value in values])):
        return []  # the usual case, found with one search
    return [name for name, values in received if any(_CONTROL.search(value) for value in values)]


@attrs.frozen
class ClientFacts:
    """What the proxy knows of the client side of one request.

    ``address`` is the TCP peer; ``origin`` the real client, which differs
    only when a trusted peer (``TRUST_FORWARDED``) forwarded the request.
    """

    address: str
    scheme: bytes
    host: bytes | None
    origin: str = attrs.field()

    @origin.default
    def _peer(self) -> str:
        return self.address


def client_facts(request: RequestView, trust: bool | ForwardTrust = False) -> ClientFacts:
    """The ``ClientFacts`` of a twisted.web request, its origin as far as ``trust`` allows."""
    peer = getattr(request.getClientAddress(), "host", None) or "unknown"
    return ClientFacts(
        address=peer,
        scheme=b"https" if request.isSecure() else b"http",
        host=request.getHeader(b"host"),
        origin=origin_address(trust, peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])),
    )


def _connection_tokens(headers: Iterable[tuple[bytes, Sequence[bytes]]]) -> frozenset[bytes]:
    """Lower-cased header names listed in ``Connection`` (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, values in headers:
        if name.lower() == b"connection":
            for value in values:
                tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _first(headers: Iterable[tuple[bytes, Sequence[bytes]]], wanted: bytes) -> bytes | None:
    for name, values in headers:
        if name.lower() == wanted and values:
            return values[0]
    return None


def upstream_request_headers(
    incoming: Iterable[tuple[bytes, Sequence[bytes]]],
    node_host: bytes,
    client: ClientFacts,
    trust_forwarded: bool | ForwardTrust = False,
    strip_origin: bool = False,
    websocket: bool = False,
) -> RawHeaders:
    """The headers to send to a node for a client request.

    Hop-by-hop headers (and those named in ``Connection``), every ``Proxy-*``
    header, the proxy's own ``X-Admin-Token``, any header whose name holds an
    underscore (``X_Forwarded_For``: servers that map ``-`` and ``_`` alike
    would read it as the real one; nginx drops these too) and any holding a
    control character (``unfit_request_headers``; the site refuses such a
    request first) are removed; ``Host`` becomes the node; ``X-Forwarded-For``,
    ``-Proto`` and ``-Host`` are added. Incoming forwarding headers are kept and
    extended only when ``trust_forwarded`` trusts the client's TCP peer
    (``True``, or a ``ForwardTrust``); otherwise they are replaced, so a
    client cannot forge its address. A WebSocket handshake keeps its
    ``Upgrade: websocket`` and says ``Connection: Upgrade``.
    """
    received = list(incoming)
    unfit = {name.lower() for name in unfit_request_headers(received)}
    incoming = [(name, values) for name, values in received if name.lower() not in unfit]
    trusted = ForwardTrust.of(trust_forwarded).trusts(client.address)
    dropped = _HOP_BY_HOP | _PROXY_CREDENTIALS | _connection_tokens(received)
    if not trusted:
        dropped = dropped | _FORWARDING
    if strip_origin:
        dropped = dropped | {b"origin"}
    out: RawHeaders = [(b"Host", [node_host])]
    earlier_for: Sequence[bytes] = ()
    for name, values in incoming:
        lowered = name.lower()
        if lowered in dropped or lowered.startswith(b"proxy-") or b"_" in lowered:
            continue
        if lowered == b"x-forwarded-for":
            earlier_for = values
            continue
        if lowered in (b"x-forwarded-proto", b"x-forwarded-host"):
            continue
        out.append((name, list(values)))
    forwarded_for = b", ".join([*earlier_for, client.address.encode("ascii", "replace")])
    out.append((b"X-Forwarded-For", [forwarded_for]))
    proto = _first(incoming, b"x-forwarded-proto") if trusted else None
    out.append((b"X-Forwarded-Proto", [proto or client.scheme]))
    host = _first(incoming, b"x-forwarded-host") if trusted else None
    host = host or client.host
    if host and not _CONTROL.search(host):
        out.append((b"X-Forwarded-Host", [host]))
    if websocket:
        out.append((b"Connection", [b"Upgrade"]))
        out.append((b"Upgrade", [b"websocket"]))
    return out


def downstream_response_headers(upstream: Iterable[tuple[bytes, list[bytes]]]) -> RawHeaders:
    """The node's response headers a client may see: hop-by-hop and ``Proxy-*`` removed.

    Twisted's client already moves ``Connection``, ``Content-Length`` and
    ``Transfer-Encoding`` aside; this also drops what a node listed in its own
    ``Connection`` header, when that reached us, and any ``X-Blyan-*`` header
    a node tried to set (the proxy sets its own).
    """
    upstream = list(upstream)
    dropped = _HOP_BY_HOP | _connection_tokens(upstream) | _BLYAN_RESPONSE
    return [
        (name, values)
        for name, values in upstream
        if name.lower() not in dropped and not name.lower().startswith(b"proxy-")
    ]
