"""A headless Chromium driven over the DevTools protocol: just enough to load a page, read it,
click, answer its dialogs, watch its network requests and take a screenshot.

Blocking (it talks over ``websockets.sync``): tests call it from a thread
(``deferToThread``) so the reactor keeps serving the proxy meanwhile.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

#: Flags that work headless in a container, with nothing fetched but what the page asks for.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-proxy-server", "--window-size=1400,700", "--remote-debugging-port=0",
)


class ProtocolError(Exception):
    """Chromium answered a command with an error."""


class Chromium:
    """One Chromium process and its first page, as a DevTools protocol session.

    Every event the page sends is kept (``events(method)``); commands wait for
    their answer at most ``timeout`` seconds.
    """

    def __init__(self, program: str, profile: Path, timeout: float = 20.0) -> None:
        self._timeout = timeout
        self._open = contextlib.ExitStack()  # what close() ends, last opened first
        self._process = subprocess.Popen(
            [program, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self._open.enter_context((profile.parent / "chromium.log").open("wb")),
        )
        self._open.callback(self._end_process)
        try:
            port = self._devtools_port(profile / "DevToolsActivePort")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as answer:
                page = next(target for target in json.load(answer) if target["type"] == "page")
            self._socket = self._open.enter_context(
                connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout))
        except BaseException:
            self._open.close()
            raise
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self._events: list[tuple[str, dict]] = []
        self._taken: dict[str, int] = {}

    def _devtools_port(self, path: Path) -> int:
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self._process.returncode}")
            if path.exists():
                first = path.read_text().split("\n", 1)[0]
                if first.isdigit():
                    return int(first)
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def _end_process(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def close(self) -> None:
        """End the session and the process."""
        self._open.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the protocol ---------------------------------------------------------------------------

    def _receive(self, deadline: float) -> None:
        message = json.loads(self._socket.recv(timeout=max(0.0, deadline - time.monotonic())))
        if "id" in message:
            self._answers[message["id"]] = message
        else:
            self._events.append((message["method"], message.get("params", {})))

    def send(self, method: str, **params: object) -> int:
        """Send a command without waiting; its id, for ``answer``."""
        self._next_id += 1
        self._socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        return self._next_id

    def answer(self, command_id: int) -> dict:
        """The result of command ``command_id`` (``ProtocolError`` when it failed)."""
        deadline = time.monotonic() + self._timeout
        while command_id not in self._answers:
            self._receive(deadline)
        message = self._answers.pop(command_id)
        if "error" in message:
            raise ProtocolError(message["error"])
        return message["result"]

    def call(self, method: str, **params: object) -> dict:
        """Send a command and wait for its result."""
        return self.answer(self.send(method, **params))

    def events(self, method: str) -> list[dict]:
        """The parameters of every ``method`` event received so far."""
        return [params for name, params in self._events if name == method]

    def wait_for_event(self, method: str) -> dict:
        """The parameters of the next ``method`` event (the first one not returned here before)."""
        taken = self._taken.get(method, 0)
        deadline = time.monotonic() + self._timeout
        while len(self.events(method)) <= taken:
            self._receive(deadline)
        self._taken[method] = taken + 1
        return self.events(method)[taken]

    # -- the page ---------------------------------------------------------------------------------

    def evaluate(self, expression: str) -> object:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise ProtocolError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_until(self, expression: str) -> object:
        """The value of ``expression`` once it is truthy (polled; ``TimeoutError`` after the timeout)."""
        deadline = time.monotonic() + self._timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"never true: {expression}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        """Save the page as a PNG."""
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
