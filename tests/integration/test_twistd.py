"""``twistd -n blyan-proxy`` end to end, in a child process: help, refusals, demo mode, stop."""

from __future__ import annotations

import json
import os
import signal
import socket

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.utils import getProcessOutputAndValue

from blyanproxy.config import SETTINGS
from blyanproxy.startup import package_version

from .processes import TWISTD, ProcessCapture, free_port
from .rawhttp import sleep

WAIT = 30.0


async def run_to_end(reactor, args, env=None):
    environment = dict(os.environ, **(env or {}))
    d = getProcessOutputAndValue(TWISTD[0], TWISTD[1:] + args, env=environment)
    return await d.addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_help_documents_every_option(reactor):
    out, err, code = await run_to_end(reactor, ["blyan-proxy", "--help"])
    assert code == 0, err
    for setting in SETTINGS:
        if setting.option:
            assert f"--{setting.option}=".encode() in out
    assert b"--node=" in out and b"--port=" in out


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({"HEALTH_INTERVAL_MS": "soon"}, [], b"HEALTH_INTERVAL_MS: expected a number of milliseconds (got 'soon')"),
        ({"NODE_3": "gpu3|gopher://x"}, [], b"NODE_3: url: must start with http:// or https://"),
        ({"NODE_0": "gpu|http://h:1|weight=0"}, [], b"NODE_0: weight: must be a whole number from 1 to 1000 (got '0')"),
        ({}, ["--policy", "random"], b"--policy: expected one of"),
        ({}, ["--port", "tcp:notaport"], b"--port"),
    ],
)
async def test_bad_settings_stop_start_up_with_a_message(reactor, env, args, expected):
    out, err, code = await run_to_end(reactor, ["--pidfile=", "blyan-proxy"] + args, env)
    assert code == 1
    assert expected in out + err
    if not expected.startswith(b"--port"):  # a setting's error is one line, without twistd's help
        assert (out, err.count(b"\n")) == (b"", 1), out + err


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("env, expected", [
    ({"NODE_0": "gpu|http://user:pw@host"}, "blyan-proxy: NODE_0: url: must not carry credentials (got 'http://***@host')"),
    ({"STATE_FILE": "/proc/nope/x"},
     "blyan-proxy: STATE_FILE: /proc/nope/x cannot be saved: No such file or directory (/proc/nope)"),
    ({"ADMIN_TOKEN_FILE": "/proc/nope/token"},
     "blyan-proxy: ADMIN_TOKEN_FILE: /proc/nope/token cannot be made: No such file or directory (/proc/nope)"),
])
async def test_a_start_up_refusal_is_one_line_naming_the_variable(reactor, tmp_path, env, expected):
    out, err, code = await run_to_end(
        reactor, ["--pidfile=", "blyan-proxy", "--port", "tcp:0:interface=127.0.0.1"],
        {"STATE_FILE": str(tmp_path / "state.json"), **env},
    )
    assert (code, out, err.decode().splitlines()) == (1, b"", [expected])
    assert b"pw" not in err


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_is_one_line_and_exit_1(reactor, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out, err, code = await run_to_end(
            reactor, ["--pidfile=", "blyan-proxy", "--port", f"tcp:{port}:interface=127.0.0.1"],
            {"STATE_FILE": str(tmp_path / "state.json")},
        )
    assert code == 1
    assert b"Traceback" not in out + err
    problems = [line for line in (out + err).decode().splitlines() if "critical" in line or "error" in line]
    assert len(problems) == 1 and problems[0].endswith(
        f"[blyanproxy.listen#critical] cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_the_start_up_summary_tells_the_fleet_after_the_state_merge(reactor, tmp_path):
    """After a restart with a state file of 3 nodes and a policy set at run time, the summary says so."""
    state = tmp_path / "state.json"
    env = {"STATE_FILE": str(state), "NODE_0": "a|http://127.0.0.1:9", "SELECTION_POLICY": "round-robin"}
    first = await start_proxy(reactor, tmp_path, env)
    try:
        token = (tmp_path / "admin_token").read_text().strip()
        headers = {"X-Admin-Token": token}
        for name, port in (("b", 10), ("c", 11)):
            added = await treq.post(f"{first.url}/_admin/nodes", json={"name": name, "baseURL": f"http://127.0.0.1:{port}"},
                                    headers=headers)
            assert added.code == 200, await added.text()
        changed = await treq.put(f"{first.url}/_admin/policy", json={"policy": "least-latency"}, headers=headers)
        assert changed.code == 200
    finally:
        await first.stop()
    assert f"state: state file {state} (created)" in first.output
    again = await start_proxy(reactor, tmp_path, env)
    await again.stop()
    summary = [line.split("] ", 1)[1] for line in again.output.splitlines() if "[blyanproxy.startup#info]" in line]
    assert summary == [
        f"blyan-proxy {package_version()} listening on 127.0.0.1:{again.port} "
        f"(tcp:{again.port}:interface=127.0.0.1), one process",
        "nodes: 3 after the state merge (a, b, c); 1 declared in the settings",
        f"state: state file {state} (loaded)",
        f"admin token: file {tmp_path / 'admin_token'} (read)",
        "policy: least-latency (set at run time and kept in the state store, over SELECTION_POLICY round-robin)",
    ]
    assert "Starting factory" not in again.output and "Stopping factory" not in again.output


@attrs.define
class RunningTwistd:
    """A ``twistd -n blyan-proxy`` child process and what it wrote."""

    reactor: object
    transport: object
    process: ProcessCapture
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return self.process.output.decode(errors="replace")

    async def stop(self) -> None:
        if not self.process.ended.called:
            self.transport.signalProcess(signal.SIGTERM)
        code, killed_by = await self.process.ended.addTimeout(WAIT, self.reactor)
        assert (code, killed_by) in ((0, None), (None, signal.SIGTERM)), self.output
        assert "Traceback" not in self.output, self.output


async def start_proxy(reactor, tmp_path, env, args=()) -> RunningTwistd:
    """``twistd -n blyan-proxy`` on a free port in ``tmp_path``, once it answers ``/health``."""
    port = free_port()
    process = ProcessCapture()
    argv = TWISTD + ["--pidfile=", "blyan-proxy", "--port", f"tcp:{port}:interface=127.0.0.1", *args]
    transport = reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ, **env), path=str(tmp_path))
    running = RunningTwistd(reactor, transport, process, port)
    for _ in range(200):
        try:
            await treq.get(f"{running.url}/health", timeout=5)
            return running
        except ConnectionRefusedError:
            await sleep(reactor, 0.1)
    await running.stop()
    raise AssertionError(running.output)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_demo_mode_proxies_to_its_simulated_nodes_and_stops_cleanly(reactor, tmp_path):
    port = free_port()
    process = ProcessCapture()
    argv = TWISTD + ["--pidfile=", "blyan-proxy", "--demo", "2", "--policy", "round-robin",
                     "--port", f"tcp:{port}:interface=127.0.0.1"]
    transport = reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ), path=str(tmp_path))
    try:
        base = f"http://127.0.0.1:{port}"
        models = []
        for _ in range(200):  # the proxy detects both engines and learns their models
            try:
                response = await treq.get(base + "/v1/models", timeout=5)
                assert response.code == 200
                models = sorted(model["id"] for model in (await response.json())["data"])
                if models == ["demo-chat", "demo-code"]:
                    break
            except ConnectionRefusedError:
                pass
            await sleep(reactor, 0.1)
        assert models == ["demo-chat", "demo-code"]  # a mixed fleet: two models, two engine kinds
        for model, node in (("demo-chat", "demo-0"), ("demo-code", "demo-1")) * 2:
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
            response = await treq.post(base + "/v1/chat/completions", data=body, timeout=5,
                                       headers={"Content-Type": "application/json"})
            assert response.code == 200
            assert response.headers.getRawHeaders("X-Blyan-Node") == [node]
            assert (await response.json())["model"] == model
    finally:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        code, killed_by = await process.ended.addTimeout(WAIT, reactor)
    # twistd re-raises the signal that stopped it, the Unix convention for "stopped by SIGTERM".
    assert (code, killed_by) in ((0, None), (None, signal.SIGTERM)), process.output.decode(errors="replace")
    assert b"Traceback" not in process.output and b"Unhandled" not in process.output
    assert b"demo node demo-0 (vllm, model demo-chat) listening" in process.output
    assert b"node demo-1 runs llamacpp" in process.output


@pytest_twisted.ensureDeferred
async def test_a_damaged_state_file_stops_start_up_and_is_kept(reactor, tmp_path):
    state = tmp_path / "state.json"
    state.write_bytes(b"{broken")
    out, err, code = await run_to_end(
        reactor,
        ["--pidfile=", "blyan-proxy", "--state-file", str(state), "--port", "tcp:0:interface=127.0.0.1"],
        {"NODE_0": "a|http://127.0.0.1:9"},
    )
    assert code != 0
    assert f"state file {state} is not valid JSON".encode() in out + err
    assert state.read_bytes() == b"{broken"
