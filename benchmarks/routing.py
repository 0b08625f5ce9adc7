"""The routing benchmark: how each selection policy does on simulated GPU nodes.

Run from the repository root (it takes about three minutes, all on 127.0.0.1)::

    .venv/bin/python benchmarks/routing.py

For each workload and policy it starts fresh simulated vLLM nodes (``devnode``, in this process,
each a GPU with ``max_num_seqs`` slots and a prefix cache), one proxy (``twistd -n blyan-proxy``,
a child process) with ``SELECTION_POLICY`` set, sends a seeded workload of streamed chat
completions through it, and prints TTFT p50/p99 (seconds to the first token), completion time p50
(seconds to the last byte) and throughput (requests per second over the run):

- ``shared-prefix``: many sessions, a few long system prompts, multi-turn conversations (each
  session sends its next turn, with the history, once the last one is answered);
- ``noisy-neighbour``: short prompts arriving at a steady rate; one node also serves clients that
  do not pass through the proxy, and keeps a queue;
- ``uniform``: short distinct prompts arriving at a steady rate, no neighbour.

Every count and duration is bounded (``--scale`` shrinks or grows them); the seed fixes prompts,
sessions and arrival times. The machine's own noise shows mostly in TTFT p99 (a few requests);
``--repeats 3`` runs every case three times, interleaved, and reports each column's median.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import attrs
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.web.client import Agent, HTTPConnectionPool

from blyanproxy.devnode import DevNodeConfig, listen_devnode

POLICIES = ("round-robin", "least-inflight", "least-load", "cache-aware")
WORKLOADS = ("shared-prefix", "noisy-neighbour", "uniform")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]

#: The simulated GPU of every node.
NODE = dict(engine="vllm", models=("sim",), ttft_ms=100.0, prompt_token_ms=1.0, tokens_per_second=100.0,
            max_tokens=20, max_num_seqs=8, prefix_cache_blocks=64)


@attrs.frozen
class Outcome:
    """One request as the client saw it: seconds to the first token and to the end (``None``: failed)."""

    ttft: float | None
    done: float | None


@attrs.frozen
class Row:
    """One policy's figures on one workload."""

    workload: str
    policy: str
    ttft_p50: float
    ttft_p99: float
    done_p50: float
    throughput: float
    failed: int


def words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(100_000)}" for _ in range(count))


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Quiet(ProcessProtocol):
    """A child whose output is kept (shown if it fails) and whose end is a Deferred."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output = (self.output + data)[-20_000:]

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


class Client:
    """Streams chat completions and times them."""

    def __init__(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 256
        self._http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    @defer.inlineCallbacks
    def chat(self, base: str, messages: list, timeout: float = 60.0):
        """One streamed chat completion: its ``Outcome``."""
        body = json.dumps({"model": "sim", "stream": True, "messages": messages}).encode()
        started = time.monotonic()
        first: list[float] = []

        def got(data: bytes) -> None:
            if not first and b"data:" in data:
                first.append(time.monotonic() - started)

        try:
            response = yield self._http.post(base + "/v1/chat/completions", data=body, unbuffered=True,
                                             headers={"Content-Type": ["application/json"]}, timeout=timeout)
            yield treq.collect(response, got)
        except Exception:
            return Outcome(None, None)
        if response.code != 200 or not first:
            return Outcome(None, None)
        return Outcome(first[0], time.monotonic() - started)


def shared_prefix(rng: random.Random, scale: float):
    """Sessions (closed loops), each a few turns long, over a few long system prompts."""
    prompts = [words(rng, 400) for _ in range(8)]
    sessions = [(rng.choice(prompts), [words(rng, 12) for _ in range(4)]) for _ in range(int(64 * scale))]
    return prompts, sessions


@defer.inlineCallbacks
def run_sessions(client: Client, base: str, sessions, concurrency: int):
    """Run every session's turns in order, ``concurrency`` sessions at a time."""
    outcomes: list[Outcome] = []
    queue = list(sessions)

    @defer.inlineCallbacks
    def worker():
        while queue:
            system, turns = queue.pop(0)
            history = [{"role": "system", "content": system}]
            for turn in turns:
                history.append({"role": "user", "content": turn})
                outcome = yield client.chat(base, history)
                outcomes.append(outcome)
                history.append({"role": "assistant", "content": "Hello from the simulated node"})

    yield defer.gatherResults([worker() for _ in range(concurrency)])
    return outcomes


@defer.inlineCallbacks
def run_arrivals(client: Client, base: str, rng: random.Random, count: int, rate: float, prompt_words: int):
    """``count`` single-turn requests at seeded Poisson arrivals of ``rate`` per second."""
    pending = []
    at = 0.0
    for _ in range(count):
        at += rng.expovariate(rate)
        messages = [{"role": "user", "content": words(rng, prompt_words)}]
        pending.append(task.deferLater(reactor, at, client.chat, base, messages))
    outcomes = yield defer.gatherResults(pending)
    return outcomes


@defer.inlineCallbacks
def neighbour(client: Client, base: str, rng: random.Random, clients: int, stop: list):
    """Clients of one node that bypass the proxy, each asking again as soon as it is answered."""

    @defer.inlineCallbacks
    def loop():
        while not stop:
            yield client.chat(base, [{"role": "user", "content": words(rng, 40)}])

    yield defer.gatherResults([loop() for _ in range(clients)])


@defer.inlineCallbacks
def start_proxy(policy: str, nodes: Sequence[str], workdir: str):
    """A proxy child with ``policy`` in front of ``nodes``; fires with (base URL, process, transport)."""
    port = free_port()
    env = dict(os.environ, SELECTION_POLICY=policy, LOAD_INTERVAL_MS="250", HEALTH_INTERVAL_MS="1000",
               ACCESS_LOG="false", LOG_LEVEL="WARN", STATE_FILE=os.path.join(workdir, f"{policy}.json"))
    for index, url in enumerate(nodes, 1):
        env[f"NODE_{index}"] = f"gpu{index}|{url}|engine=vllm"
    process = Quiet()
    argv = TWISTD + ["blyan-proxy", "--port", f"tcp:{port}:interface=127.0.0.1"]
    transport = reactor.spawnProcess(process, argv[0], argv, env=env, path=workdir)
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            response = yield treq.get(base + "/health", timeout=2)
            yield response.content()
            if response.code == 200:
                break
        except Exception:
            pass
        yield task.deferLater(reactor, 0.1, lambda: None)
    else:
        raise SystemExit("the proxy did not start:\n" + process.output.decode(errors="replace"))
    yield task.deferLater(reactor, 0.6, lambda: None)  # two load reads
    return base, process, transport


@defer.inlineCallbacks
def one_run(workload: str, policy: str, seed: int, scale: float, count: int, workdir: str):
    """Fresh nodes, a fresh proxy, one workload: the ``Row``."""
    started = [listen_devnode(reactor, DevNodeConfig(name=f"gpu{i}", **NODE)) for i in range(count)]
    urls = [f"http://127.0.0.1:{listening.getHost().port}" for _, listening in started]
    base, process, transport = yield start_proxy(policy, urls, workdir)
    client = Client()
    rng = random.Random(seed)
    stop: list = []
    background = None
    begun = time.monotonic()
    try:
        if workload == "shared-prefix":
            _, sessions = shared_prefix(rng, scale)
            outcomes = yield run_sessions(client, base, sessions, concurrency=16)
        else:
            if workload == "noisy-neighbour":
                background = neighbour(client, urls[0], random.Random(seed + 1), clients=12, stop=stop)
                yield task.deferLater(reactor, 0.6, lambda: None)
            outcomes = yield run_arrivals(client, base, rng, int(400 * scale), rate=40.0, prompt_words=60)
    finally:
        span = time.monotonic() - begun
        stop.append(True)
        if background is not None:
            yield background
        transport.signalProcess(signal.SIGTERM)
        yield process.ended
        print("    requests per node:", [node.stats.requests for node, _ in started], file=sys.stderr)
        for node, listening in started:
            yield listening.stopListening()
            yield node.disconnect_all()
    good = [o for o in outcomes if o.ttft is not None]
    ttfts = [o.ttft for o in good if o.ttft is not None]
    dones = [o.done for o in good if o.done is not None]
    return Row(workload, policy, percentile(ttfts, 0.5), percentile(ttfts, 0.99), percentile(dones, 0.5),
               len(good) / span, len(outcomes) - len(good))


def median_row(rows: Sequence[Row]) -> Row:
    """One row of the medians, column by column, of several rounds of one run."""
    def middle(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return Row(rows[0].workload, rows[0].policy, middle([r.ttft_p50 for r in rows]),
               middle([r.ttft_p99 for r in rows]), middle([r.done_p50 for r in rows]),
               middle([r.throughput for r in rows]), sum(r.failed for r in rows))


def table(rows: Sequence[Row]) -> str:
    lines = ["| workload | policy | TTFT p50 s | TTFT p99 s | completion p50 s | throughput req/s | failed |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.workload} | {r.policy} | {r.ttft_p50:.3f} | {r.ttft_p99:.3f} | {r.done_p50:.3f} | "
              f"{r.throughput:.1f} | {r.failed} |" for r in rows]
    return "\n".join(lines)


def targets(rows: Sequence[Row]) -> list[str]:
    """The issue's targets that this run measured, each with its ratio and whether it was met."""
    by = {(r.workload, r.policy): r for r in rows}
    ratios: list[tuple[str, tuple[tuple[str, str], ...], Callable[[Row, Row], float], float]] = [
        ("shared-prefix cache-aware TTFT p50 / round-robin's", (("shared-prefix", "cache-aware"),
         ("shared-prefix", "round-robin")), lambda new, old: new.ttft_p50 / old.ttft_p50, 0.5),
        ("noisy-neighbour least-load TTFT p99 / least-inflight's", (("noisy-neighbour", "least-load"),
         ("noisy-neighbour", "least-inflight")), lambda new, old: new.ttft_p99 / old.ttft_p99, 0.6),
    ]
    for policy in ("least-load", "cache-aware"):
        pair = (("uniform", policy), ("uniform", "round-robin"))
        ratios.append((f"uniform {policy} / round-robin, worst column", pair,
                       lambda new, old: max(new.ttft_p50 / old.ttft_p50, new.ttft_p99 / old.ttft_p99,
                                            new.done_p50 / old.done_p50, old.throughput / new.throughput), 1.05))
    found = []
    for name, (new, old), ratio, limit in ratios:
        if new in by and old in by:
            value = ratio(by[new], by[old])
            found.append(f"{'met' if value <= limit else 'MISSED'}: {name} = {value:.2f} (target <= {limit})")
    return found


@defer.inlineCallbacks
def main(arguments: Sequence[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink (<1) or grow the request counts")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every run (interleaved); each column is the median of the rounds")
    options = parser.parse_args(arguments)
    if not 1 <= options.nodes <= 16 or not 0.05 <= options.scale <= 4 or not 1 <= options.repeats <= 9:
        raise SystemExit("--nodes from 1 to 16, --scale from 0.05 to 4, --repeats from 1 to 9")
    runs: dict[tuple[str, str], list[Row]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(options.repeats):
            for workload in options.workloads.split(","):
                for policy in options.policies.split(","):
                    row = yield one_run(workload, policy, options.seed, options.scale, options.nodes, workdir)
                    runs.setdefault((workload, policy), []).append(row)
                    print(f"  {workload} {policy}: TTFT p50 {row.ttft_p50:.3f} s, p99 {row.ttft_p99:.3f} s",
                          file=sys.stderr)
    rows = [median_row(each) for each in runs.values()]
    print(table(rows))
    print()
    print("\n".join(targets(rows)))


if __name__ == "__main__":
    task.react(lambda _reactor: main(sys.argv[1:]))
