"""Throwaway TLS material for tests: a CA, and a certificate it signs for 127.0.0.1 and localhost."""

from __future__ import annotations

import datetime
import ipaddress

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@attrs.frozen
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _valid_for_a_day(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + day)


def certificate_authority(common_name: str = "blyanproxy test CA") -> tuple[Issued, object]:
    """A self-signed CA valid for a day: its PEM material, and its key for signing."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _valid_for_a_day(
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
    ).add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256())
    return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key


def server_certificate(ca: Issued, ca_key, common_name: str = "blyanproxy test server") -> Issued:
    """A server certificate for 127.0.0.1 and localhost, signed by ``ca``, valid for a day."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    certificate = _valid_for_a_day(
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(issuer.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
    ).add_extension(x509.SubjectAlternativeName(names), critical=False).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True,
    ).add_extension(
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False,
    ).sign(ca_key, hashes.SHA256())
    return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))
