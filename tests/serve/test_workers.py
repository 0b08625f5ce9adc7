"""The worker supervisor's pure parts: restart delays and a worker's role."""

import socket

import pytest

from blyanproxy.serve.workers import LONGEST_DELAY, WorkerRole, restart_delay, worker_role


def test_restart_delays_double_up_to_a_limit():
    assert [restart_delay(n) for n in range(5)] == [0.5, 0.5, 1.0, 2.0, 4.0]
    assert restart_delay(40) == LONGEST_DELAY


def test_worker_role():
    assert worker_role({}) is None
    assert worker_role({"BLYANPROXY_WORKER": f"2:3:{int(socket.AF_INET)}"}) == WorkerRole(2, 3, socket.AF_INET)
    with pytest.raises(ValueError):
        worker_role({"BLYANPROXY_WORKER": "x"})
