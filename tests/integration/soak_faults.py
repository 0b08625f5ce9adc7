"""A soak with faults: a ``twistd -n blyan-proxy`` on etcd, simulated nodes killed, frozen and flapping.

Everything runs on 127.0.0.1: etcd (the ``STATE_STORE``), ``--nodes``
``twistd -n blyan-devnode`` processes, and the proxy. For ``--duration``
seconds (default 600) these run at once, each a loop bounded in time and in
count:

- traffic: SSE chat streams, plain requests (model lists, whole completions),
  slow senders (a body in pieces), slow readers (an 8 MiB body read with
  pauses), and clients that vanish mid-stream;
- faults, one at a time, in turn: a node killed (SIGKILL) and started again,
  a node frozen (SIGSTOP, SIGCONT ``FREEZE_SECONDS`` later), a node flapping
  (its /health toggled 503/200 through ``POST /_devnode/config``), etcd
  stopped and started again;
- admin changes every ``ADMIN_EVERY`` seconds: weights, the policy, a node
  added and removed, a drain and undrain (503 while etcd is away is expected).

At the end of each of ``--phases`` phases the proxy's open descriptors,
resident memory and in-flight count are read; then everything is put back
(nodes running, healthy, etcd up), the load stops, and the report says how
every exchange ended (``soakclients``: ok, error, cut, timeout, vanished,
false success), the figures after the load has drained, and whether the
fleet in etcd is intact: every key readable, the same fleet the proxy
serves, every declared node present, and the last admin changes held.

Until issue 20's item 3 is fixed, a request sent to a frozen node ends only
with the client's timeout; such timeouts are counted apart (``timeout``), not
judged.

Run it: ``python -m tests.integration.soak_faults --duration 600`` from the
repository root (``tests/integration/test_soak_faults.py`` runs one minute).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import sys
import tempfile
import time

import treq
from twisted.internet import defer, task, threads
from twisted.internet.error import ConnectError

from blyanproxy.core import POLICIES
from blyanproxy.store.etcdkeys import b64, kvs_from_range, range_end, state_from_keys

from .etcdserver import EtcdServer, location
from .processes import TWISTD, Child, free_port
from .rawhttp import sleep
from .soakclients import ERROR, chat_body, exchange, request_bytes
from .soakreport import Figures, Report, proxy_figures

TOKEN = "soak-admin-token-0123456789abcdef"
AUTH = {"X-Admin-Token": TOKEN}
FREEZE_SECONDS = 10.0
KILLED_SECONDS = 3.0
ETCD_DOWN_SECONDS = 3.0
FLAPS = 4
ADMIN_EVERY = 2.0
STREAM_TIMEOUT = 8.0  # shorter than FREEZE_SECONDS: requests held by a frozen node end here
SLOW_READ_TIMEOUT = 40.0
SLOW_READ_BYTES = 8 * 1024 * 1024


async def until_answering(reactor, url: str, attempts: int = 300) -> None:
    for _ in range(attempts):
        try:
            response = await treq.get(url, timeout=2)
            await response.content()
            return
        except (ConnectError, defer.TimeoutError, defer.CancelledError):
            await sleep(reactor, 0.1)
    raise RuntimeError(f"{url} never answered")


async def until_admin_writes(soak, attempts: int = 300) -> None:
    """Wait until the proxy takes admin writes again (in step with etcd after a restart)."""
    for _ in range(attempts):
        policy = await soak.admin("GET", "/_admin/policy", count=False)
        if policy and await soak.admin("PUT", "/_admin/policy", {"policy": policy["policy"]}, count=False):
            return
        await sleep(soak.reactor, 0.1)


class Soak:
    """One soak run (see the module docstring); ``run()`` returns its ``Report``."""

    def __init__(self, reactor, workdir: str, duration: float, phases: int = 6, nodes: int = 4,
                 seed: int = 20) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.duration = duration
        self.phase_count = phases
        self.random = random.Random(seed)
        self.report = Report(duration)
        self.etcd = EtcdServer(os.path.join(workdir, "etcd"))
        self.store_url = ""
        self.node_ports = [free_port() for _ in range(nodes)]
        self.nodes: list[Child] = []
        self.proxy: Child | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra: str | None = None  # the id of the node the admin changes added, while it is there
        self.expected: dict = {}  # what the last admin changes, made once everything is back, left
        self.started = 0.0
        self.deadline = 0.0

    # -- the fleet --------------------------------------------------------------------------

    async def start(self) -> None:
        await threads.deferToThread(self.etcd.start)
        self.store_url = self.etcd.store_url()
        env = dict(os.environ)
        for index, port in enumerate(self.node_ports):
            node = Child(self.reactor, TWISTD + ["--pidfile=", "blyan-devnode", "--port",
                                                 f"tcp:{port}:interface=127.0.0.1", "--name", f"soak-{index}",
                                                 "--tps", "40", "--ttft-ms", "50"], env, self.workdir)
            node.start()
            self.nodes.append(node)
        proxy_env = dict(env, ADMIN_TOKEN=TOKEN, STATE_STORE=self.store_url, ACCESS_LOG="false",
                         LISTEN=f"tcp:{self.port}:interface=127.0.0.1", HEALTH_INTERVAL_MS="500",
                         HEALTH_TIMEOUT_MS="500", POOL_IDLE_TIMEOUT_MS="1000", ETCD_TIMEOUT_MS="1000",
                         DRAIN_GRACE_MS="5000",
                         **{f"NODE_{i}": f"soak-{i}|http://127.0.0.1:{port}" for i, port in enumerate(self.node_ports)})
        self.proxy = Child(self.reactor, TWISTD + ["--pidfile=", "blyan-proxy"], proxy_env, self.workdir)
        self.proxy.start()
        for port in self.node_ports:
            await until_answering(self.reactor, f"http://127.0.0.1:{port}/health")
        await until_answering(self.reactor, self.url + "/health")
        for _ in range(300):  # in step with etcd: admin writes are refused until then
            response = await treq.put(self.url + "/_admin/policy", json={"policy": "least-inflight"},
                                      headers=AUTH, timeout=5)
            await response.content()
            if response.code == 200:
                break
            await sleep(self.reactor, 0.1)

    async def figures(self) -> Figures:
        status = await self.admin("GET", "/_admin/status", count=False)
        in_flight = sum(node["inFlight"] for node in status["nodes"]) if status else -1
        return proxy_figures(self.proxy.pid, in_flight, self.reactor.seconds() - self.started)

    async def admin(self, method: str, path: str, body=None, count: bool = True):
        """An admin call; its JSON on 200, else None (its status is counted)."""
        try:
            response = await treq.request(method, self.url + path, json=body, headers=AUTH, timeout=10)
            answer = await response.content()
        except Exception as exc:  # the proxy did not answer in time: counted, never judged here
            if count:
                self.report.admin[type(exc).__name__] += 1
            return None
        if count:
            route = re.sub(r"/nodes/[^/]+", "/nodes/{id}", path)
            self.report.admin[f"{method} {route} {response.code}"] += 1
        return json.loads(answer) if response.code == 200 else None

    # -- traffic ----------------------------------------------------------------------------

    def running(self) -> bool:
        return self.reactor.seconds() < self.deadline

    async def _loop(self, kind: str, one, pause: float = 0.0) -> None:
        """Run ``one()`` again and again until the deadline, each outcome counted; bounded in count too."""
        for _ in range(int(self.duration * 50) + 1):
            if not self.running():
                return
            ended = await one()
            self.report.outcomes[(kind, ended.outcome)] += 1
            if ended.code is not None:
                self.report.error_codes[ended.code] += 1
            if pause or ended.outcome == ERROR:
                await sleep(self.reactor, pause or 0.1)  # a client backs off after an error

    def _stream(self):
        return exchange(self.reactor, self.port, [request_bytes("POST", "/v1/chat/completions",
                                                                chat_body(True, 20))], STREAM_TIMEOUT, stream=True)

    def _plain(self):
        if self.random.random() < 0.5:
            return exchange(self.reactor, self.port, [request_bytes("GET", "/v1/models")], STREAM_TIMEOUT, False)
        return exchange(self.reactor, self.port, [request_bytes("POST", "/v1/chat/completions", chat_body(False, 10))],
                        STREAM_TIMEOUT, stream=False)

    def _slow_sender(self):
        whole = request_bytes("POST", "/v1/chat/completions", chat_body(True, 10))
        pieces = [whole[i:i + 40] for i in range(0, len(whole), 40)]
        return exchange(self.reactor, self.port, pieces, STREAM_TIMEOUT + 5, stream=True, gap=0.05)

    def _slow_reader(self):
        return exchange(self.reactor, self.port, [request_bytes("GET", f"/_devnode/bytes?size={SLOW_READ_BYTES}")],
                        SLOW_READ_TIMEOUT, stream=False, read_pause=0.3, read_run=0.05)

    def _vanishing(self):
        return exchange(self.reactor, self.port, [request_bytes("POST", "/v1/chat/completions", chat_body(True, 40))],
                        STREAM_TIMEOUT, stream=True, vanish_after=self.random.uniform(0.05, 0.6))

    # -- faults and admin changes -------------------------------------------------------------

    async def _faults(self) -> None:
        kinds = itertools.cycle(["kill", "freeze", "flap", "etcd"])
        targets = itertools.cycle(range(len(self.nodes)))
        await sleep(self.reactor, 2.0)  # streams under way on every node first
        for _ in range(int(self.duration) + 1):
            if not self.running():
                return
            kind = next(kinds)
            self.report.faults[kind] += 1
            if kind == "etcd":
                await threads.deferToThread(self.etcd.stop)
                await sleep(self.reactor, ETCD_DOWN_SECONDS)
                await threads.deferToThread(self.etcd.start)
            else:
                index = next(targets)
                await getattr(self, f"_{kind}")(index)
            await sleep(self.reactor, 2.0)

    async def _kill(self, index: int) -> None:
        node = self.nodes[index]
        node.signal(signal.SIGKILL)
        await node.process.ended
        await sleep(self.reactor, KILLED_SECONDS)
        node.start()
        await until_answering(self.reactor, f"http://127.0.0.1:{self.node_ports[index]}/health")

    async def _freeze(self, index: int) -> None:
        self.nodes[index].signal(signal.SIGSTOP)
        await sleep(self.reactor, FREEZE_SECONDS)
        self.nodes[index].signal(signal.SIGCONT)

    async def _flap(self, index: int) -> None:
        for flap in range(FLAPS):
            await self._node_health(index, 503 if flap % 2 == 0 else 200)
            await sleep(self.reactor, 1.0)
        await self._node_health(index, 200)

    async def _node_health(self, index: int, status: int) -> None:
        url = f"http://127.0.0.1:{self.node_ports[index]}/_devnode/config"
        response = await treq.post(url, json={"health_status": status}, timeout=5)
        await response.content()

    async def _admin_changes(self) -> None:
        for turn in range(int(self.duration / ADMIN_EVERY) + 1):
            if not self.running():
                return
            await self._admin_change(turn)
            await sleep(self.reactor, ADMIN_EVERY)

    async def _admin_change(self, turn: int) -> None:
        listed = await self.admin("GET", "/_admin/nodes", count=False)
        if not listed:
            return
        declared = [node for node in listed["nodes"] if node.get("declaredBy")]
        which = turn % 4
        if which == 0:
            node = self.random.choice(declared)
            await self.admin("PATCH", f"/_admin/nodes/{node['id']}", {"weight": self.random.randint(1, 5)})
        elif which == 1:
            await self.admin("PUT", "/_admin/policy", {"policy": tuple(POLICIES)[turn % len(POLICIES)]})
        elif which == 2:
            await self._toggle_extra_node()
        else:
            node = self.random.choice(declared)
            if await self.admin("POST", f"/_admin/nodes/{node['id']}/drain") is not None:
                for _ in range(40):  # undrained once the store takes it (etcd may be away a moment)
                    await sleep(self.reactor, 0.5)
                    if await self.admin("PATCH", f"/_admin/nodes/{node['id']}", {"draining": False}) is not None:
                        break

    async def _toggle_extra_node(self) -> None:
        """Add a node (node 0 again, by another name of its host), or remove it if it is there."""
        if self.extra is None:
            added = await self.admin("POST", "/_admin/nodes", {"name": "extra",
                                                                "baseURL": f"http://localhost:{self.node_ports[0]}"})
            if added is not None:
                self.extra = added["node"]["id"]
        elif await self.admin("DELETE", f"/_admin/nodes/{self.extra}") is not None:
            self.extra = None

    # -- phases, the end, the fleet check -------------------------------------------------------

    async def _phases(self) -> None:
        length = self.duration / self.phase_count
        for phase in range(1, self.phase_count + 1):
            await sleep(self.reactor, max(0.0, self.started + phase * length - self.reactor.seconds()))
            self.report.phases.append(await self.figures())

    async def _put_back(self) -> None:
        """Every node running, not frozen, healthy; etcd up; no drain left; the last changes made again."""
        if not self.etcd.process or self.etcd.process.poll() is not None:
            await threads.deferToThread(self.etcd.start)
        for index, node in enumerate(self.nodes):
            node.signal(signal.SIGCONT)
            if not node.running:
                node.start()
            await until_answering(self.reactor, f"http://127.0.0.1:{self.node_ports[index]}/health")
            await self._node_health(index, 200)
        await until_admin_writes(self)
        listed = await self.admin("GET", "/_admin/nodes", count=False) or {"nodes": []}
        # The last admin changes, each of which must be taken now that etcd is back.
        self.expected = {"policy": "round-robin", "weights": {}, "problems": []}
        changes = [("PUT", "/_admin/policy", {"policy": "round-robin"})]
        for node in listed["nodes"]:
            if node.get("declaredBy"):
                self.expected["weights"][node["id"]] = 2
                changes.append(("PATCH", f"/_admin/nodes/{node['id']}", {"weight": 2, "draining": False}))
            else:  # the node the admin changes added
                changes.append(("DELETE", f"/_admin/nodes/{node['id']}", None))
        for method, path, body in changes:
            if await self.admin(method, path, body) is None:
                self.expected["problems"].append(f"{method} {path} was not taken")

    async def check_fleet(self) -> list[str]:
        """What is wrong with the fleet etcd holds (nothing: it is intact)."""
        problems: list[str] = []
        prefix = location(self.store_url).prefix
        answer = await threads.deferToThread(
            self.etcd.request, "kv/range", {"key": b64(prefix), "range_end": b64(range_end(prefix))})
        skipped: dict = {}
        state = state_from_keys(kvs_from_range(answer), prefix, skipped.__setitem__)
        if skipped:
            problems.append(f"unreadable keys {sorted(skipped)}")
        if state is None:
            return problems + ["etcd holds no fleet"]
        listed = await self.admin("GET", "/_admin/nodes", count=False)
        policy = await self.admin("GET", "/_admin/policy", count=False)
        served = {(n["id"], n["baseURL"], n["weight"], n["draining"]) for n in (listed or {"nodes": []})["nodes"]}
        held = {(n.id, n.base_url, n.weight, n.draining) for n in state.nodes}
        if served != held:
            problems.append(f"the proxy serves {sorted(served)} but etcd holds {sorted(held)}")
        declared = {f"http://127.0.0.1:{port}" for port in self.node_ports}
        if not declared <= {n.base_url for n in state.nodes}:
            problems.append("a declared node is missing")
        if (policy or {}).get("policy") != self.expected["policy"] or state.policy != self.expected["policy"]:
            problems.append(f"policy {state.policy} in etcd, {self.expected['policy']} expected")
        weights = {n.id: (n.weight, n.draining) for n in state.nodes}
        wrong = {i: weights.get(i) for i, w in self.expected["weights"].items() if weights.get(i) != (w, False)}
        if wrong:
            problems.append(f"weights or drains not held: {wrong}")
        if len(state.nodes) != len(self.node_ports):
            problems.append(f"{len(state.nodes)} nodes in etcd, {len(self.node_ports)} expected")
        return self.expected["problems"] + problems

    async def run(self) -> Report:
        try:
            await self.start()
            self.started = self.reactor.seconds()
            self.deadline = self.started + self.duration
            self.report.start = await self.figures()
            loops = [self._loop("stream", self._stream) for _ in range(8)]
            loops += [self._loop("plain", self._plain, 0.05) for _ in range(4)]
            loops += [self._loop("slow_sender", self._slow_sender), self._loop("slow_reader", self._slow_reader),
                      self._loop("vanishing", self._vanishing, 0.2), self._loop("vanishing", self._vanishing, 0.2)]
            loops += [self._faults(), self._admin_changes(), self._phases()]
            await defer.gatherResults([defer.ensureDeferred(loop) for loop in loops], consumeErrors=True)
            await self._put_back()
            await self._settle_figures()
            self.report.fleet_problems = await self.check_fleet()
        finally:
            await self._stop_all()
        return self.report

    async def _settle_figures(self) -> None:
        """Wait (at most 30 s) for in-flight to drain and idle node connections to close, then read the figures."""
        for _ in range(60):
            figures = await self.figures()
            if figures.in_flight == 0:
                break
            await sleep(self.reactor, 0.5)
        await sleep(self.reactor, 3.0)  # idle upstream connections close after POOL_IDLE_TIMEOUT_MS
        self.report.end = await self.figures()

    async def _stop_all(self) -> None:
        if self.proxy is not None:
            self.report.proxy_exit = await self.proxy.stop()
            self.report.proxy_tracebacks = self.proxy.process.output.count(b"Traceback")
        for node in self.nodes:
            await node.stop()
        await threads.deferToThread(self.etcd.stop)


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.integration.soak_faults [--duration S] [--phases N] [--nodes N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load and faults (600)")
    parser.add_argument("--phases", type=int, default=6, help="phases the figures are read at (6)")
    parser.add_argument("--nodes", type=int, default=4, help="simulated nodes (4)")
    options = parser.parse_args(argv)

    async def soak(reactor):
        with tempfile.TemporaryDirectory(prefix="blyan-soak-") as workdir:
            started = time.monotonic()
            report = await Soak(reactor, workdir, options.duration, options.phases, options.nodes).run()
            print(report.text())
            print(f"  wall time {time.monotonic() - started:.0f} s")
            if report.count("false_success") or report.fleet_problems:
                sys.exit(1)

    task.react(lambda reactor: defer.ensureDeferred(soak(reactor)))


if __name__ == "__main__":
    main()
