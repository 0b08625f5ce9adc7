"""https nodes: verified by default, trusted through a CA bundle, or opted out per node."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

from blyanproxy.config import NodeSpec
from blyanproxy.devnode import DevNode, DevNodeConfig
from blyanproxy.tap import node_from_spec

# Twisted's server-side TLS options still hand pyOpenSSL objects to pyOpenSSL.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


def self_signed():
    """A certificate and key for 127.0.0.1 and localhost, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blyanproxy test node")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert_pem, key_pem


@pytest.fixture
def tls_node(reactor, tmp_path):
    """A simulated node serving https on 127.0.0.1, and the path of its certificate."""
    cert_pem, key_pem = self_signed()
    options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
    node = DevNode(DevNodeConfig(name="tls"), reactor)
    port = reactor.listenSSL(0, node.site(), options, interface="127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cert_pem)
    yield f"https://127.0.0.1:{port.getHost().port}", str(ca_file)
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(node.disconnect_all())


async def models_through(proxy):
    response = await treq.get(proxy.url + "/v1/models", timeout=10)
    return response.code, await response.json()


@pytest_twisted.ensureDeferred
async def test_an_unverifiable_node_is_refused_by_default(tls_node, proxy_factory):
    url, _ = tls_node
    proxy = await proxy_factory([url])
    code, body = await models_through(proxy)
    assert (code, body["error"]["code"]) == (502, "upstream_tls")


@pytest_twisted.ensureDeferred
async def test_a_ca_bundle_makes_the_node_trusted(tls_node, proxy_factory):
    url, ca_file = tls_node
    proxy = await proxy_factory([url], tls_ca_file=ca_file)
    code, body = await models_through(proxy)
    assert (code, body["object"]) == (200, "list")


@pytest_twisted.ensureDeferred
async def test_a_node_may_opt_out_of_verification_explicitly(tls_node, proxy_factory):
    url, _ = tls_node
    proxy = await proxy_factory([])
    proxy.registry.add(node_from_spec(NodeSpec("tls", url, "test", tls_verify=False), 0.0))
    code, body = await models_through(proxy)
    assert (code, body["object"]) == (200, "list")
