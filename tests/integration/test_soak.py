"""Load and soak: 2,000 concurrent SSE streams through one ``twistd blyan-proxy`` process.

The proxy and four simulated nodes run as child processes; the streams are raw
sockets on the test's reactor. Halfway through, the admin API changes the
fleet and one node is killed. Every stream must complete or end with a clear
error, in-flight counts return to zero, and memory and file descriptors return
near their starting level. The figures are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import gatherResults
from twisted.internet.error import ConnectionRefusedError

from .processes import TWISTD, ProcessCapture, free_port
from .rawhttp import RawClient, sleep
from .test_admin import AUTH, TOKEN

STREAMS = 2000
NODES = 4
TOKENS = 20
TOKENS_PER_SECOND = 4.0
#: Descriptors per stream: the client's socket here, and two in the proxy (client side and node side).
FDS_NEEDED = 2 * STREAMS + 400


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def proc_figures(pid: int) -> dict:
    """Resident memory now and at its peak (MiB), and open descriptors, of process ``pid``."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0]) / 1024.0
    figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return figures


class Stream(RawClient):
    """One SSE chat completion; knows whether it completed, failed clearly, or neither."""

    @property
    def completed(self) -> bool:
        return b"data: [DONE]" in self.received and self.received.endswith(b"\r\n0\r\n\r\n")

    @property
    def failed_clearly(self) -> bool:
        head = self.received.partition(b"\r\n\r\n")[0]
        return b"event: error" in self.received or (head.startswith(b"HTTP/1.1 5") and b'"code"' in self.received)


async def spawn(reactor, argv, env, cwd):
    process = ProcessCapture()
    transport = reactor.spawnProcess(process, argv[0], argv, env=env, path=cwd)
    return process, transport


async def wait_listening(reactor, url: str) -> None:
    for _ in range(300):
        try:
            await treq.get(url, timeout=5)
            return
        except ConnectionRefusedError:
            await sleep(reactor, 0.1)
    raise AssertionError(f"{url} never answered")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_two_thousand_streams_with_admin_changes_and_a_node_failure(reactor, tmp_path):
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    limit = raise_fd_limit()
    if limit < FDS_NEEDED:
        pytest.skip(f"the hard descriptor limit {limit} is below the {FDS_NEEDED} that {STREAMS} streams need")
    env = dict(os.environ)
    children = []
    try:
        node_ports = [free_port() for _ in range(NODES)]
        for index, port in enumerate(node_ports):
            argv = TWISTD + ["--pidfile=", "blyan-devnode", "--port", f"tcp:{port}:interface=127.0.0.1",
                             "--name", f"soak-{index}", "--tps", str(TOKENS_PER_SECOND), "--ttft-ms", "100"]
            children.append(await spawn(reactor, argv, env, str(tmp_path)))
        proxy_port = free_port()
        proxy_env = dict(env, ADMIN_TOKEN=TOKEN, STATE_FILE=str(tmp_path / "state.json"), ACCESS_LOG="false",
                         POOL_IDLE_TIMEOUT_MS="1000", HEALTH_INTERVAL_MS="1000",
                         MAX_CONNECTIONS_PER_CLIENT="0",  # every stream comes from this one address
                         LISTEN=f"tcp:{proxy_port}:interface=127.0.0.1:backlog=4096",
                         SELECTION_POLICY="least-inflight",
                         **{f"NODE_{i}": f"soak-{i}|http://127.0.0.1:{port}" for i, port in enumerate(node_ports)})
        proxy_process, proxy_transport = await spawn(reactor, TWISTD + ["--pidfile=", "blyan-proxy"], proxy_env,
                                                     str(tmp_path))
        children.append((proxy_process, proxy_transport))
        url = f"http://127.0.0.1:{proxy_port}"
        for port in node_ports:
            await wait_listening(reactor, f"http://127.0.0.1:{port}/health")
        await wait_listening(reactor, url + "/health")
        pid = proxy_transport.pid
        await sleep(reactor, 1.0)
        before = proc_figures(pid)
        body = json.dumps({"model": "blyan-sim-7b", "stream": True, "max_tokens": TOKENS,
                           "messages": [{"role": "user", "content": "soak"}]}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

        async def wave(during):
            """Open every stream, run ``during`` once they are open, wait for all to end; the figures."""
            started = time.monotonic()
            streams = []
            for _ in range(0, STREAMS, 250):
                batch = [connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port, timeout=10),
                                         Stream(reactor)) for _ in range(250)]
                for stream in await gatherResults(batch):
                    stream.transport.write(request)
                    streams.append(stream)
            ramped = time.monotonic() - started
            await sleep(reactor, 1.0)
            busy = proc_figures(pid)
            busy["open"] = sum(1 for s in streams if not s.closed.called)
            await during()
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and not all(s.closed.called for s in streams):
                await sleep(reactor, 0.25)
            elapsed = time.monotonic() - started
            hung = [s for s in streams if not s.closed.called]
            for stream in hung:
                stream.transport.abortConnection()
            await sleep(reactor, 3.0)  # idle upstream connections close after POOL_IDLE_TIMEOUT_MS
            after = proc_figures(pid)
            status = await (await treq.get(url + "/_admin/status", headers=AUTH, timeout=10)).json()
            return {
                "ramp": ramped, "elapsed": elapsed, "busy": busy, "after": after, "hung": len(hung),
                "in_flight": sum(node["inFlight"] for node in status["nodes"]),
                "completed": sum(1 for s in streams if s.completed),
                "errored": sum(1 for s in streams if not s.completed and s.failed_clearly),
                "unclear": [s.received[-300:] for s in streams if not s.completed and not s.failed_clearly],
            }

        async def admin_changes_and_a_node_failure():
            listed = await (await treq.get(url + "/_admin/nodes", headers=AUTH, timeout=10)).json()
            ids = [node["id"] for node in listed["nodes"]]
            changes = [
                ("PATCH", f"/_admin/nodes/{ids[0]}", {"weight": 3}),
                ("PUT", "/_admin/policy", {"policy": "round-robin"}),
                ("POST", "/_admin/nodes", {"name": "late", "baseURL": "http://127.0.0.1:9"}),
                ("PUT", "/_admin/policy", {"policy": "least-inflight"}),
            ]
            for method, path, document in changes:
                response = await treq.request(method, url + path, json=document, headers=AUTH, timeout=10)
                assert response.code == 200, (method, path, await response.text())
            children[NODES - 1][1].signalProcess(signal.SIGKILL)  # a node's process dies outright

        async def nothing():
            pass

        first = await wave(admin_changes_and_a_node_failure)
        second = await wave(nothing)  # the same load again: a leak would grow memory or descriptors
        for name, figures in (("with admin changes and a node killed", first), ("again, steady", second)):
            print(f"\nsoak wave {name}: {STREAMS} streams ({TOKENS} tokens at {TOKENS_PER_SECOND:g}/s), "
                  f"ramp {figures['ramp']:.1f} s, all ended after {figures['elapsed']:.1f} s; "
                  f"open together {figures['busy']['open']}; completed {figures['completed']}, "
                  f"clear error {figures['errored']}, unclear {len(figures['unclear'])}, hung {figures['hung']}; "
                  f"in flight after {figures['in_flight']}; proxy RSS {before['VmRSS']:.1f} MiB before, "
                  f"{figures['busy']['VmRSS']:.1f} busy, peak {figures['after']['VmHWM']:.1f}, "
                  f"{figures['after']['VmRSS']:.1f} after; fds {before['fds']} before, {figures['busy']['fds']} busy, "
                  f"{figures['after']['fds']} after")
        for figures in (first, second):
            assert figures["hung"] == 0 and not figures["unclear"], figures["unclear"][:3]
            assert figures["completed"] + figures["errored"] == STREAMS
            assert figures["in_flight"] == 0
            assert figures["after"]["fds"] <= before["fds"] + 5
        assert first["busy"]["open"] > STREAMS * 0.9 and first["completed"] > STREAMS // 2
        assert second["completed"] == STREAMS
        # Memory: the second wave reuses what the first took instead of growing again.
        assert second["after"]["VmRSS"] <= first["after"]["VmRSS"] + 16
        assert second["after"]["VmHWM"] <= first["after"]["VmHWM"] + 16
    finally:
        for process, transport in children:
            if not process.ended.called:
                transport.signalProcess(signal.SIGTERM)
        await gatherResults([process.ended.addTimeout(30, reactor) for process, _ in children], consumeErrors=True)
