"""Proxies sharing one fleet through a real etcd with TLS and authentication on (issue 20, item 5).

etcd serves https with a certificate from a throwaway CA; authentication is
turned on through its gateway, as ``etcdctl user add``, ``role grant-permission``
and ``auth enable`` do, with a user allowed only the test's prefix.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from blyanproxy.store.etcdkeys import b64, range_end, unb64

from .certs import certificate_authority, server_certificate
from .etcdserver import EtcdServer, location
from .rawhttp import eventually, sleep
from .test_admin import TOKEN, call
from .test_etcd import PROPAGATION, in_step, urls

PASSWORD = "Proxy-Pa55word-7f3a"
ROOT_PASSWORD = "Root-Pa55word-91c2"


@pytest.fixture
def secure_etcd(tmp_path):
    """A TLS etcd (not yet with auth) and the path of the CA that signed its certificate."""
    ca, ca_key = certificate_authority()
    issued = server_certificate(ca, ca_key)
    files = {"ca.pem": ca.cert_pem, "server.pem": issued.cert_pem, "server.key": issued.key_pem}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        (tmp_path / name).chmod(0o600)
    ca_file, cert_file, key_file = (str(tmp_path / name) for name in files)
    server = EtcdServer(tmp_path / "etcd", tls=(ca_file, cert_file, key_file)).start()
    yield server, ca_file
    server.stop()


@pytest.fixture
def logged():
    """Every log line written during the test, formatted, with its fields (a callable)."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: "\n".join(formatEvent(event) + repr(event) for event in events)
    globalLogPublisher.removeObserver(events.append)


def password_file(tmp_path, password):
    path = tmp_path / "etcd-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


async def secure_proxy(proxy_factory, store_url, **access):
    return await proxy_factory([], persist=True, admin_token=TOKEN, state_store=location(store_url),
                               etcd_timeout=2.0, **access)


async def admin_write_until_accepted(reactor, proxy, body, attempts=50):
    """POST a node until the proxy's store takes it (etcd may still be coming back)."""
    for _ in range(attempts):
        response, answer = await call(proxy, "POST", "/_admin/nodes", body)
        if response.code != 503:
            return response, answer
        await sleep(reactor, 0.2)
    return response, answer


@pytest_twisted.ensureDeferred
async def test_proxies_share_a_fleet_through_etcd_with_tls_and_a_login(reactor, tmp_path, secure_etcd,
                                                                       proxy_factory, logged):
    server, ca_file = secure_etcd
    store_url = server.store_url()
    prefix = location(store_url).prefix
    server.enable_auth(ROOT_PASSWORD, "blyan", PASSWORD, prefix)
    access = {"etcd_user": "blyan", "etcd_password_file": password_file(tmp_path, PASSWORD),
              "etcd_ca_file": ca_file}
    a = await secure_proxy(proxy_factory, store_url, **access)
    b = await secure_proxy(proxy_factory, store_url, **access)
    for proxy in (a, b):
        await in_step(reactor, proxy)

    added, body = await call(a, "POST", "/_admin/nodes", {"name": "gpu-a", "baseURL": "http://10.4.0.1:8000"})
    assert added.code == 200, body
    await eventually(reactor, lambda: urls(b) == ["http://10.4.0.1:8000"], timeout=PROPAGATION)
    held = server.request("kv/range", {"key": b64(prefix), "range_end": b64(range_end(prefix))})  # as root
    assert prefix + b"nodes/" + body["node"]["id"].encode() in [unb64(kv["key"]) for kv in held["kvs"]]

    # A restarted etcd has forgotten every token: the next write logs in again, the watches come back.
    server.stop()
    server.start()
    added, body = await admin_write_until_accepted(reactor, a, {"name": "gpu-b", "baseURL": "http://10.4.0.2:8000"})
    assert added.code == 200, body
    await eventually(reactor, lambda: urls(b) == ["http://10.4.0.1:8000", "http://10.4.0.2:8000"],
                     timeout=PROPAGATION * 4)
    lines = logged()
    assert PASSWORD not in lines and ROOT_PASSWORD not in lines


@pytest_twisted.ensureDeferred
async def test_an_untrusted_certificate_or_a_wrong_password_keeps_the_store_away(reactor, tmp_path, secure_etcd,
                                                                                 proxy_factory, logged):
    server, ca_file = secure_etcd
    store_url = server.store_url()
    server.enable_auth(ROOT_PASSWORD, "blyan", PASSWORD, location(store_url).prefix)
    untrusting = await secure_proxy(proxy_factory, store_url, etcd_user="blyan",
                                    etcd_password_file=password_file(tmp_path, PASSWORD))
    (tmp_path / "wrong").mkdir()
    wrong = await secure_proxy(proxy_factory, store_url, etcd_user="blyan", etcd_ca_file=ca_file,
                               etcd_password_file=password_file(tmp_path / "wrong", "not-" + PASSWORD))
    await sleep(reactor, 1.0)
    for proxy in (untrusting, wrong):
        response, body = await call(proxy, "PUT", "/_admin/policy", {"policy": "round-robin"})
        assert (response.code, body["code"]) == (503, "state_store_unavailable")
    lines = logged()
    assert "invalid user ID or password" in lines
    assert PASSWORD not in lines.replace("not-" + PASSWORD, "")
