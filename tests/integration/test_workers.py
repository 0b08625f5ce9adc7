"""``twistd -n blyan-proxy --workers 2``: two processes on one port, restarted when they die, stopped together."""

from __future__ import annotations

import os
import re
import signal

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred, gatherResults

from .etcdserver import EtcdServer
from .processes import TWISTD, ProcessCapture, free_port
from .rawhttp import sleep
from .test_admin import TOKEN
from .test_twistd import run_to_end

WAIT = 30.0
WORKER_INFO = re.compile(rb'blyan_worker_info\{pid="(\d+)",worker="(\d+)"\} 1.0')


async def scrape(url):
    """The worker info of whichever worker answers a scrape on a new connection (empty if none)."""
    try:
        response = await treq.get(url + "/metrics", timeout=5, persistent=False)
        return WORKER_INFO.findall(await response.content())
    except Exception:  # not listening yet, or a worker stopping under us
        return []


async def workers_seen(reactor, url, wanted, rounds=200):
    """Scrape ``/metrics`` (8 at once, so busy workers leave some to the others) until ``wanted(seen)``;
    ``seen`` is ``{worker: pid}``."""
    seen = {}
    for _ in range(rounds):
        for found in await gatherResults([ensureDeferred(scrape(url)) for _ in range(8)]):
            seen.update({int(worker): int(pid) for pid, worker in found})
        if wanted(seen):
            return seen
        await sleep(reactor, 0.05)
    raise AssertionError(f"workers seen: {seen}")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_workers_share_the_port_are_restarted_and_stop_together(reactor, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd").start()
    port = free_port()
    process = ProcessCapture()
    argv = TWISTD + ["--pidfile=", "blyan-proxy", "--workers", "2", "--port", f"tcp:{port}:interface=127.0.0.1"]
    env = dict(os.environ, ADMIN_TOKEN=TOKEN, STATE_STORE=etcd.store_url())
    supervisor = reactor.spawnProcess(process, argv[0], argv, env=env, path=str(tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        first = await workers_seen(reactor, url, lambda seen: set(seen) == {1, 2})
        os.kill(first[1], signal.SIGKILL)
        again = await workers_seen(reactor, url, lambda seen: seen.get(1) not in (None, first[1]))
        assert again[2] == first[2]
    finally:
        if not process.ended.called:
            supervisor.signalProcess(signal.SIGTERM)
        code, killed_by = await process.ended.addTimeout(WAIT, reactor)
        etcd.stop()
    assert (code, killed_by) in ((0, None), (None, signal.SIGTERM)), process.output.decode(errors="replace")
    for pid in (first[2], again[1]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    output = process.output
    assert b"worker 1 exited (signal 9)" in output and b"starting it again" in output
    assert b"Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_workers_with_the_state_file_are_refused(reactor, tmp_path):
    out, err, code = await run_to_end(
        reactor, ["--pidfile=", "blyan-proxy", "--workers", "2", "--state-file", str(tmp_path / "s.json")],
    )
    assert code != 0
    assert b"--workers: 2 workers need STATE_STORE=etcd://host:port/prefix" in out + err
