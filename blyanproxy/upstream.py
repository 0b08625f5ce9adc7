"""The upstream client: one ``Agent`` over a persistent connection pool, and TLS trust."""

from __future__ import annotations

from io import BytesIO
from typing import Callable, Optional

import attrs
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import succeed
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

#: Bodies up to this size are written in one go; larger ones as paused/resumed chunks.
_ONE_WRITE_LIMIT = 64 * 1024


@attrs.frozen
class PoolSettings:
    """Sizing and timeouts of the upstream connection pool."""

    max_idle_per_node: int = 128
    idle_timeout: float = 4.0


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's protocol factory, without a log line for every new connection."""

    noisy = False


def load_trust_root(path: str):
    """Trust the CA certificates of a PEM bundle; ``ValueError`` naming the file if unusable."""
    try:
        with open(path, "rb") as pem:
            data = pem.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in data.split(marker) if b"-----BEGIN" in block]
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as exc:  # OpenSSL reports malformed PEM with its own error types
        raise ValueError(f"{path} holds a malformed certificate ({exc})") from None
    return ssl.trustRootFromCertificates(certificates)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS to a node whose operator turned verification off: SNI set, nothing checked."""

    def __init__(self, hostname: bytes) -> None:
        self._hostname = hostname
        self._context = ssl.CertificateOptions().getContext()

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class NodeTLSPolicy:
    """Verify every https node (against ``trust_root`` or the system roots) unless
    ``verify_for(host, port)`` says that node opted out."""

    def __init__(self, verify_for: Callable[[bytes, int], bool], trust_root=None) -> None:
        self._verify_for = verify_for
        self._verified = BrowserLikePolicyForHTTPS(trustRoot=trust_root)

    def creatorForNetloc(self, hostname: bytes, port: int):
        if self._verify_for(hostname, port):
            return self._verified.creatorForNetloc(hostname, port)
        return _UnverifiedTLS(hostname)


@implementer(IAgentEndpointFactory)
class NodeEndpoints:
    """Client endpoints to nodes: TCP, with TLS for https, and no resolver round trip
    for IP literals (a node named by address connects at once)."""

    def __init__(self, reactor, tls_policy: IPolicyForHTTPS, connect_timeout: float) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._timeout = connect_timeout

    def endpoint(self, scheme: str, host: str, port: int):
        """The endpoint for one node address."""
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        if scheme == "https":
            creator = self._tls_policy.creatorForNetloc(host.encode("ascii"), port)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint

    def endpointForURI(self, uri):
        return self.endpoint(uri.scheme.decode("ascii"), uri.host.decode("ascii"), uri.port)


def make_agent(reactor, settings: PoolSettings, endpoints: NodeEndpoints):
    """An ``Agent`` with a persistent pool sized by ``settings``; returns ``(agent, pool)``."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = settings.max_idle_per_node
    pool.cachedConnectionTimeout = settings.idle_timeout
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool), pool


@implementer(IBodyProducer)
class _BytesProducer:
    """A small body written at once."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        if self._body:
            consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body was written at start."""

    def resumeProducing(self) -> None:
        """Nothing to resume: the body was written at start."""

    def stopProducing(self) -> None:
        """Nothing to stop: the body was written at start."""


def body_producer(method: bytes, body: bytes) -> Optional[IBodyProducer]:
    """A fresh producer of ``body`` for one attempt (``None``: no body, no Content-Length).

    Methods that carry a body always get one, so an empty POST says
    ``Content-Length: 0``. Large bodies are written in chunks that a slow node
    can pause.
    """
    if not body and method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"):
        return None
    if len(body) <= _ONE_WRITE_LIMIT:
        return _BytesProducer(body)
    return FileBodyProducer(BytesIO(body))
