"""``LOG_FORMAT=json`` end to end: every line a real twistd proxy writes on stdout is one flat JSON object."""

from __future__ import annotations

import json
import os
import signal
from datetime import datetime

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import ProcessProtocol

from .processes import TWISTD, free_port
from .rawhttp import sleep
from .test_forwarding import closed_port_url

WAIT = 30.0
TOKEN = "json-log-admin-token-0123456789"
#: The fields every access event carries (``request_id`` too once requests have IDs).
ACCESS_FIELDS = {"method", "path", "status", "node", "attempts", "ttfb_ms", "duration_ms", "bytes_in", "bytes_out",
                 "ended", "client"}
LEVELS = {"debug", "info", "warn", "error", "critical"}


class Outputs(ProcessProtocol):
    """A child's standard output and error, apart; ``ended`` fires with ``(exit code, signal)``."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback((reason.value.exitCode, getattr(reason.value, "signal", None)))


async def until_up(reactor, url: str) -> None:
    for _ in range(200):
        try:
            await (await treq.get(url, timeout=5)).content()
            return
        except ConnectionRefusedError:
            await sleep(reactor, 0.1)
    raise AssertionError(f"{url} never answered")


async def fetch(method, url, **kwargs):
    response = await treq.request(method, url, timeout=10, **kwargs)
    return response.code, await response.content()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_every_stdout_line_of_a_busy_run_is_one_flat_json_object(reactor, tmp_path, devnode_factory):
    streaming = devnode_factory(name="gpu-a", tokens_per_second=200.0, ttft_ms=0.0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, LOG_FORMAT="json", LOG_LEVEL="DEBUG", ADMIN_TOKEN=TOKEN,
               NODE_0=f"gpu-a|{streaming.url}", NODE_1=f"gone|{closed_port_url()}", HEALTH_INTERVAL_MS="200")
    process = Outputs()
    argv = TWISTD + ["--pidfile=", "blyan-proxy", "--port", f"tcp:{port}:interface=127.0.0.1",
                     "--state-file", str(tmp_path / "state.json")]
    transport = reactor.spawnProcess(process, argv[0], argv, env=env, path=str(tmp_path))
    try:
        await until_up(reactor, f"{url}/health")
        assert (await fetch("GET", f"{url}/_devnode/echo?api_key=secret"))[0] == 200
        code, streamed = await fetch("POST", f"{url}/v1/chat/completions", json={
            "model": "blyan-sim-7b", "stream": True, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        assert code == 200 and streamed.rstrip().endswith(b"data: [DONE]")
        failed_code, failed_body = await fetch("GET", f"{url}/_devnode/echo?api=gone")  # only the dead node may take it
        assert failed_code in (502, 503)
        assert (await fetch("GET", f"{url}/_admin/status", headers={"X-Admin-Token": TOKEN}))[0] == 200
        assert (await fetch("GET", f"{url}/_admin/status"))[0] == 401
        changed = await fetch("PUT", f"{url}/_admin/policy", headers={"X-Admin-Token": TOKEN},
                              json={"policy": "round-robin"})
        assert changed[0] == 200
    finally:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        code, killed_by = await process.ended.addTimeout(WAIT, reactor)
    assert (code, killed_by) in ((0, None), (None, signal.SIGTERM)), process.out + process.err
    assert process.err == b""

    lines = process.out.decode("ascii").splitlines()  # the JSON is ASCII: other characters are escaped
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert len(events) > 20
    for event in events:
        assert isinstance(event, dict) and list(event)[:4] == ["time", "level", "namespace", "message"], event
        datetime.fromisoformat(event["time"].replace("Z", "+00:00"))  # RFC 3339
        assert event["time"].endswith("Z") and event["level"] in LEVELS, event
        assert isinstance(event["message"], str) and event["message"], event
        assert not [key for key in event if key.startswith("log_") or key == "line"], event
        assert all(not isinstance(value, dict) or key == "metadata" for key, value in event.items()), event  # flat
        assert "Starting factory" not in event["message"] and "Stopping factory" not in event["message"], event
    namespaces = {event["namespace"] for event in events}
    assert {"twisted.scripts._twistd_unix.UnixAppLogger", "log_legacy", "blyanproxy.startup",
            "blyanproxy.access", "blyanproxy.health", "blyanproxy.balancer", "blyanproxy.admin"} <= namespaces

    access = [event for event in events if event["namespace"] == "blyanproxy.access"]
    for event in access:
        assert ACCESS_FIELDS <= set(event), event
    by_path = {event["path"]: event for event in access}
    assert "secret" not in process.out.decode()  # query values are redacted, the token never logged
    assert TOKEN not in process.out.decode()
    models = by_path["/_devnode/echo?api_key=…"]
    assert (models["method"], models["status"], models["node"], models["ended"]) == ("GET", 200, "gpu-a", "complete")
    assert models["message"].startswith("127.0.0.1 GET /_devnode/echo?api_key=… status=200 node=gpu-a attempts=1 ")
    stream = by_path["/v1/chat/completions"]
    assert stream["status"] == 200 and stream["bytes_out"] >= len(streamed)  # as relayed (a chunked body framed)
    assert isinstance(stream["ttfb_ms"], float) and stream["duration_ms"] >= stream["ttfb_ms"]
    failure = by_path["/_devnode/echo?api=…"]
    assert (failure["status"], failure["bytes_out"]) == (failed_code, len(failed_body))  # the proxy's own answer
    assert failure["ended"] == "error"
    assert by_path["/_admin/status"]["own_endpoint"] is True
    chosen = [event for event in events if event["namespace"] == "blyanproxy.balancer" and "chosen" in event["message"]]
    assert chosen and all(event["level"] == "debug" and event["node"] == "gpu-a" for event in chosen)
