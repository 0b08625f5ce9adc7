"""The shipped nginx site in front of the proxy, in front of simulated nodes, all on loopback.

A real nginx (Debian's package) runs the site from etc/nginx rendered for
loopback ports and a test certificate. Clients connect from 127.0.0.1 (on the
admin allow-list) or 127.0.0.2 (not on it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl as stdlib_ssl
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import ssl
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.threads import deferToThread

from blyanproxy.config import SETTINGS_BY_FIELD
from blyanproxy.core.trust import parse_forward_trust

from .capture import strict_requests
from .processes import ProcessCapture, free_port
from .rawhttp import RawClient, sleep
from .test_forwarding import chat_request, sse_events
from .test_tls import self_signed
from .tools import require_program

SITE = Path(__file__).resolve().parents[2] / "etc" / "nginx" / "blyan-proxy.conf"
TOKEN = "t" * 32
OUTSIDER = "127.0.0.2"  # a client address that is not on the admin allow-list
WAIT = 10.0


def render_site(values: dict) -> str:
    """The shipped site with its ``@NAME@`` placeholders replaced (as install.sh does)."""
    text = SITE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text


class Nginx:
    """An nginx master process in a temporary prefix, stopped by its PID at the end."""

    def __init__(self, reactor, directory: Path, upstream_port: int):
        self.reactor = reactor
        self.directory = directory
        self.program = require_program("nginx")
        self.port = free_port()
        cert_pem, key_pem = self_signed()
        (directory / "cert.pem").write_bytes(cert_pem)
        (directory / "key.pem").write_bytes(key_pem)
        self.cert_pem = cert_pem
        site = render_site({
            "DOMAIN": "localhost", "HTTP_LISTEN": f"127.0.0.1:{free_port()}", "HTTPS_LISTEN": f"127.0.0.1:{self.port}",
            "UPSTREAM": f"127.0.0.1:{upstream_port}", "CERT": str(directory / "cert.pem"),
            "KEY": str(directory / "key.pem"),
        })
        assert "@" not in "".join(line.split("#")[0] for line in site.splitlines())
        (directory / "site.conf").write_text(site)
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp = "\n".join(f"    {kind}_temp_path {directory}/{kind};" for kind in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (directory / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {directory}/nginx.pid;\nerror_log {directory}/error.log info;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n    access_log {directory}/access.log;\n{temp}\n    include {directory}/site.conf;\n}}\n"
        )
        self.argv = [self.program, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"]
        self.capture = ProcessCapture()
        self.process = None

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv[:-2] + ["-t"], capture_output=True, text=True, timeout=30)

    async def start(self) -> bool:
        """Run it; whether it came up (False: it ended, e.g. a port was taken meanwhile)."""
        self.process = self.reactor.spawnProcess(self.capture, self.program, self.argv, env=dict(os.environ))
        pid_file = self.directory / "nginx.pid"
        for _ in range(200):
            if self.capture.ended.called:
                return False
            if pid_file.exists():  # written once every listening socket is open
                try:
                    client = await self.connect()
                    client.transport.loseConnection()
                    return True
                except ConnectionRefusedError:
                    pass
            await sleep(self.reactor, 0.05)
        raise AssertionError("nginx did not start: " + self.capture.output.decode(errors="replace"))

    async def stop(self):
        if self.process is not None and not self.capture.ended.called:
            self.process.signalProcess(signal.SIGQUIT)  # graceful: workers finish, then the master exits
            await self.capture.ended.addTimeout(WAIT, self.reactor)

    def connect(self, source: str = "127.0.0.1"):
        """A raw client over TLS (trusting the test certificate), from ``source``."""
        options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(self.cert_pem))
        endpoint = SSL4ClientEndpoint(self.reactor, "127.0.0.1", self.port, options, timeout=5,
                                      bindAddress=(source, 0))
        return connectProtocol(endpoint, RawClient(self.reactor))

    async def fetch(self, target: bytes, source: str = "127.0.0.1", headers: bytes = b""):
        """``(status, head, body)`` of one HTTP/1.0 request (an unchunked answer) with this exact target."""
        client = await self.connect(source)
        client.transport.write(b"GET " + target + b" HTTP/1.0\r\nHost: localhost\r\n"
                               + headers + b"\r\n")
        received = await client.wait_closed(WAIT)
        head, _, body = received.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), head, body


@pytest.fixture
def nginx_factory(reactor, tmp_path):
    """``await nginx_factory(upstream_port)``: the shipped site, checked and running, in front of that port."""
    started = []

    async def start(upstream_port: int) -> Nginx:
        for attempt in range(3):  # fresh ports if one was taken between choosing and binding it
            directory = tmp_path / f"nginx{attempt}"
            directory.mkdir()
            nginx = Nginx(reactor, directory, upstream_port)
            checked = nginx.check()
            assert checked.returncode == 0, checked.stderr
            started.append(nginx)
            if await nginx.start():
                return nginx
        raise AssertionError("nginx ended at start three times: " + (directory / "error.log").read_text())

    yield start
    for nginx in started:
        pytest_twisted.blockon(ensureDeferred(nginx.stop()))


@pytest.fixture
def stack(devnode_factory, proxy_factory, nginx_factory):
    """``await stack()``: a node, the proxy (trusting only 127.0.0.1) and nginx in front."""

    async def start(**node_config):
        node = devnode_factory(**node_config)
        proxy = await proxy_factory([node.url], trust_forwarded=parse_forward_trust("127.0.0.1,::1"),
                                    admin_token=TOKEN)
        nginx = await nginx_factory(int(proxy.url.rsplit(":", 1)[1]))
        return node, proxy, nginx

    return start


@pytest_twisted.ensureDeferred
async def test_an_sse_stream_arrives_event_by_event_through_nginx_and_the_proxy(stack):
    node, proxy, nginx = await stack(tokens_per_second=10.0, ttft_ms=0.0)
    client = await nginx.connect()
    client.transport.write(chat_request(max_tokens=10).replace(b"Host: x", b"Host: localhost"))
    await client.wait_for(b"chat.completion.chunk", timeout=WAIT)
    assert b"[DONE]" not in client.received  # the first event came on its own, the rest still generating
    received = await client.wait_for(b"data: [DONE]", timeout=WAIT)
    head = received.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200") and b"X-Blyan-Node: node0" in head
    assert len([t for t, data in client.arrivals if b"chat.completion.chunk" in data]) >= 5
    assert json.loads(sse_events(received)[-2])["choices"][0]["finish_reason"] == "length"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_websocket_echoes_through_nginx_and_the_proxy(stack):
    node, proxy, nginx = await stack()

    def talk():
        from websockets.sync.client import connect as ws_connect

        context = stdlib_ssl.create_default_context(cafile=str(nginx.directory / "cert.pem"))
        url = f"wss://localhost:{nginx.port}/api/ws/echo"
        with ws_connect(url, ssl=context, open_timeout=5, close_timeout=2) as ws:
            ws.send("hello through nginx")
            text = ws.recv(timeout=5)
            ws.send(b"\x00\x01")
            return text, ws.recv(timeout=5), ws.response.headers.get("X-Blyan-Node")

    assert await deferToThread(talk) == ("hello through nginx", b"\x00\x01", "node0")


@pytest_twisted.ensureDeferred
async def test_the_client_address_reaches_the_node_and_the_access_log(stack, access_lines):
    node, proxy, nginx = await stack()
    forged = b"X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
    status, head, body = await nginx.fetch(b"/api/_devnode/echo", source=OUTSIDER, headers=forged)
    assert status == 200
    seen = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert seen["x-forwarded-for"] == f"{OUTSIDER}, 127.0.0.1"
    assert seen["x-real-ip"] == OUTSIDER
    assert seen["x-forwarded-proto"] == "https"
    assert any(line.startswith(f"{OUTSIDER} GET /api/_devnode/echo status=200") for line in access_lines)


@pytest.mark.parametrize("target", [
    b"/_admin/nodes", b"/_admin", b"/%5Fadmin/nodes", b"/%5fadmin/nodes", b"//_admin/nodes", b"/./_admin/nodes",
    b"/x/../_admin/nodes", b"/_ADMIN/nodes", b"/api/_admin/nodes", b"/api/%5Fadmin/nodes", b"//api//_admin/nodes",
])
@pytest_twisted.ensureDeferred
async def test_admin_is_refused_by_nginx_for_others_in_every_spelling(stack, access_lines, target):
    node, proxy, nginx = await stack()
    status, head, body = await nginx.fetch(target, source=OUTSIDER, headers=f"X-Admin-Token: {TOKEN}\r\n".encode())
    assert status in (403, 404)
    assert b"<center>nginx" in body  # nginx's own answer: the proxy never saw it
    assert access_lines == [] and node.node.stats.by_path == {}


@pytest_twisted.ensureDeferred
async def test_admin_answers_the_allow_list_and_no_prefix_gets_through(stack):
    node, proxy, nginx = await stack()
    status, _, body = await nginx.fetch(b"/_admin/nodes", headers=f"X-Admin-Token: {TOKEN}\r\n".encode())
    assert status == 200 and json.loads(body)
    status, _, _ = await nginx.fetch(b"/_admin/nodes")
    assert status == 401  # the proxy's own check still applies
    status, _, body = await nginx.fetch(b"/api/_admin/nodes", headers=f"X-Admin-Token: {TOKEN}\r\n".encode())
    assert status == 404 and b"<center>nginx" in body


def _forwarded_heads(capture) -> list[dict[bytes, bytes]]:
    """The headers (lower-case names) of every request nginx sent the capture node, in order."""
    return [dict(headers) for stream in capture.received for _, headers, _ in strict_requests(stream)]


@pytest.mark.parametrize(("upgrade", "connection"), [
    (b"foo", None), (b"h2c", None), (b"websocket, foo", None),
    (b"websocket", b"upgrade"), (b"WebSocket", b"upgrade"),
])
@pytest_twisted.ensureDeferred
async def test_only_a_websocket_upgrade_reaches_the_upstream_as_an_upgrade(capture_node, nginx_factory,
                                                                           upgrade, connection):
    # nginx straight in front of a recording node: what the proxy would be sent.
    capture = capture_node()
    nginx = await nginx_factory(int(capture.url.rsplit(":", 1)[1]))
    status, _, _ = await nginx.fetch(b"/_devnode/echo", headers=b"Connection: upgrade\r\nUpgrade: " + upgrade + b"\r\n")
    assert status == 200
    [head] = _forwarded_heads(capture)
    assert head.get(b"connection") == connection
    assert head.get(b"upgrade") == (upgrade if connection else None)


@pytest_twisted.ensureDeferred
async def test_nginx_does_not_follow_an_x_accel_redirect_from_a_node(stack):
    node, proxy, nginx = await stack()
    status, head, body = await nginx.fetch(
        b"/_devnode/echo", headers=b"X-Devnode-Set-Header: X-Accel-Redirect: /_status\r\n")
    assert status == 200
    assert json.loads(body).get("uri") == "/_devnode/echo"  # the node's own answer, not /_status
    assert b"x-accel" not in head.lower()


@pytest.mark.parametrize("target", [b"/_status", b"/metrics", b"/%5Fstatus", b"//metrics", b"/x/../_status"])
@pytest_twisted.ensureDeferred
async def test_status_and_metrics_are_refused_by_nginx_for_others(stack, access_lines, target):
    node, proxy, nginx = await stack()
    status, head, body = await nginx.fetch(target, source=OUTSIDER)
    assert status == 403 and b"<center>nginx" in body
    assert access_lines == []  # the proxy never saw it


@pytest_twisted.ensureDeferred
async def test_status_and_metrics_answer_the_allow_list_and_health_stays_public(stack):
    node, proxy, nginx = await stack()
    status, _, body = await nginx.fetch(b"/_status")
    assert status == 200 and json.loads(body)["total"] == 1
    status, _, body = await nginx.fetch(b"/metrics")
    assert status == 200 and b"# TYPE" in body
    status, _, body = await nginx.fetch(b"/health", source=OUTSIDER)
    assert status == 200 and json.loads(body)["status"] == "healthy"


def _directive(block: str, name: str) -> str:
    """The value of the one ``name`` directive written directly in ``block`` (comments ignored)."""
    [value] = re.findall(rf"^\s*{name}\s+([^;]+);", re.sub(r"#.*", "", block), re.M)
    return value.strip()


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[unit]


def test_nginx_lets_idle_connections_go_before_the_proxy_closes_them():
    # The proxy closes a connection with no new request head after HEADER_TIMEOUT_MS: nginx
    # must not keep an idle connection to it (nor to a client) that long, or it would reuse
    # a connection the proxy is closing.
    head_deadline = float(SETTINGS_BY_FIELD["header_timeout"].default) / 1000
    site = SITE.read_text()
    upstream = re.search(r"^upstream blyan_proxy \{(.*?)^\}", site, re.M | re.S).group(1)
    https = re.search(r"^server \{\n\s+listen @HTTPS_LISTEN@.*?^\}", site, re.M | re.S).group(0)
    assert _seconds(_directive(upstream, "keepalive_timeout")) < head_deadline
    assert _seconds(_directive(https, "keepalive_timeout")) < head_deadline


@pytest.mark.parametrize("target", [
    b"/_admin;/status", b"/_admin%20/status", b"/_admin\\status", b"/_admin/..%2Fstatus", b"/_admin%2Fstatus",
    b"/api/_ADMIN%3B/nodes",
])
@pytest_twisted.ensureDeferred
async def test_admin_spellings_nginx_lets_by_are_refused_by_the_proxy(stack, target):
    node, proxy, nginx = await stack()
    status, head, body = await nginx.fetch(target, source=OUTSIDER, headers=f"X-Admin-Token: {TOKEN}\r\n".encode())
    assert status in (400, 403, 404), (status, body)
    assert b'"nodes"' not in body and b'"policy"' not in body  # never the admin app's answer
    assert node.node.stats.by_path == {}  # and never the node
