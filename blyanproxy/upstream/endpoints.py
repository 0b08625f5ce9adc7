"""How the proxy reaches nodes: endpoints (TCP, TLS) and the trust placed in their certificates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConnector, IReactorTCP, IStreamClientEndpoint
    from twisted.internet.protocol import ClientFactory
    from twisted.protocols.tls import TLSMemoryBIOProtocol
    from twisted.web.client import URI

    from blyanproxy.twistedinternals import IOpenSSLTrustRoot


def load_trust_root(path: str) -> IOpenSSLTrustRoot:
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

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A client connection with SNI set and no verification."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class NodeTLSPolicy:
    """Verify every https node (against ``trust_root`` or the system roots) unless
    ``verify_for(host, port)`` says that node opted out."""

    def __init__(
        self, verify_for: Callable[[bytes, int], bool], trust_root: IOpenSSLTrustRoot | None = None
    ) -> None:
        self._verify_for = verify_for
        self._verified = BrowserLikePolicyForHTTPS(trustRoot=trust_root)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """Verifying TLS for ``hostname:port``, unless that node opted out."""
        if self._verify_for(hostname, port):
            return self._verified.creatorForNetloc(hostname, port)
        return _UnverifiedTLS(hostname)


@implementer(IAgentEndpointFactory)
class NodeEndpoints:
    """Client endpoints to nodes: TCP, with TLS for https, and no resolver round trip
    for IP literals (a node named by address connects at once).

    ``reactor`` also keeps time and resolves names (``HostnameEndpoint`` needs both).
    """

    def __init__(self, reactor: IReactorTCP, tls_policy: IPolicyForHTTPS, connect_timeout: float) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._timeout = connect_timeout

    def connects_directly(self, scheme: str, host: str) -> bool:
        """Whether a node at ``host`` is reached with ``connect_tcp`` (plain TCP to an IP address)."""
        return scheme == "http" and (isIPAddress(host) or isIPv6Address(host))

    def connect_tcp(self, host: str, port: int, factory: ClientFactory) -> IConnector:
        """Connect to an IP address over plain TCP, with the connect timeout."""
        return self._reactor.connectTCP(host, port, factory, timeout=self._timeout)

    def endpoint(self, scheme: str, host: str, port: int) -> IStreamClientEndpoint:
        """The endpoint for one node address."""
        endpoint: IStreamClientEndpoint
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

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """``IAgentEndpointFactory``, so an ``Agent`` (health probes) reaches nodes the same way."""
        return self.endpoint(uri.scheme.decode("ascii"), uri.host.decode("ascii"), uri.port)
