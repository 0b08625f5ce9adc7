"""``twistd -n blyan-proxy`` end to end, in a child process: help, refusals, demo mode, stop."""

from __future__ import annotations

import json
import os
import signal

import pytest
import pytest_twisted
import treq
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.utils import getProcessOutputAndValue

from blyanproxy.config import SETTINGS

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
        ({"NODE_3": "gpu3|gopher://x"}, [], b"NODE_3: the URL must start with http:// or https://"),
        ({}, ["--policy", "random"], b"--policy: expected one of"),
        ({}, ["--port", "tcp:notaport"], b"--port"),
    ],
)
async def test_bad_settings_stop_start_up_with_a_message(reactor, env, args, expected):
    out, err, code = await run_to_end(reactor, ["--pidfile=", "blyan-proxy"] + args, env)
    assert code != 0
    assert expected in out + err


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
