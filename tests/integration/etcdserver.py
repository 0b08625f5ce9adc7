"""A real etcd for tests: a child process on free loopback ports with its data in a temporary directory."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.request
import uuid

from blyanproxy.store.etcdkeys import b64, range_end
from blyanproxy.store.storeurl import parse_state_store

from .processes import free_port
from .tools import require_program

START_TIMEOUT = 20.0


class EtcdServer:
    """One etcd member; ``start()`` waits until it answers, ``stop()`` ends it by its PID.

    With ``tls`` (an ``(ca_file, cert_file, key_file)`` triple) it serves https
    with that certificate; ``enable_auth`` then turns authentication on.
    """

    def __init__(self, data_dir, tls: tuple[str, str, str] | None = None) -> None:
        self.program = require_program("etcd")
        self.data_dir = str(data_dir)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self.process = None
        self.log = None
        self.root_password: str | None = None
        self._context = ssl.create_default_context(cafile=tls[0]) if tls else None

    def start(self) -> EtcdServer:
        """Start (or start again, on the same ports and data) and wait until etcd answers."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            self.program, "--name", "test", "--data-dir", self.data_dir,
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
        ]
        if self.tls:
            argv += ["--cert-file", self.tls[1], "--key-file", self.tls[2]]
        self.log = open(f"{self.data_dir}.log", "ab")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}; see {self.data_dir}.log")
            try:
                self.request("kv/range", {"key": "AA=="})
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not answer within {START_TIMEOUT} s")

    def request(self, path: str, body: dict) -> dict:
        """A blocking call to the JSON gateway (for set-up and checks only), as root once auth is on."""
        headers = {}
        if self.root_password is not None and path != "auth/authenticate":
            headers["Authorization"] = self.request("auth/authenticate",
                                                    {"name": "root", "password": self.root_password})["token"]
        call = urllib.request.Request(f"{self.url}/v3/{path}", data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(call, timeout=2, context=self._context) as response:
            return json.loads(response.read())

    def enable_auth(self, root_password: str, user: str, password: str, prefix: bytes) -> None:
        """Authentication on: ``root``, and ``user`` with read and write on ``prefix`` only.

        Through the gateway, as ``etcdctl user add``, ``role grant-permission --prefix`` and
        ``auth enable`` do it.
        """
        prefix_range = {"key": b64(prefix), "range_end": b64(range_end(prefix))}
        for path, body in [
            ("auth/role/add", {"name": "root"}),
            ("auth/user/add", {"name": "root", "password": root_password}),
            ("auth/user/grant", {"user": "root", "role": "root"}),
            ("auth/role/add", {"name": user}),
            ("auth/role/grant", {"name": user, "perm": {"permType": "READWRITE", **prefix_range}}),
            ("auth/user/add", {"name": user, "password": password}),
            ("auth/user/grant", {"user": user, "role": user}),
            ("auth/enable", {}),
        ]:
            self.request(path, body)
        self.root_password = root_password

    def store_url(self) -> str:
        """A ``STATE_STORE`` value with a prefix of its own (tests sharing a server never meet)."""
        scheme = "etcd+https" if self.tls else "etcd"
        return f"{scheme}://127.0.0.1:{self.client_port}/test-{uuid.uuid4().hex[:12]}"

    def stop(self) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after 10 s) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.log is not None:
            self.log.close()


def location(store_url: str):
    """The ``EtcdLocation`` of a ``STATE_STORE`` value."""
    return parse_state_store(store_url)
