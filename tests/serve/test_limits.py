"""The client limits' counters: request-body bytes held at once, connections per address."""

from blyanproxy.core import parse_forward_trust
from blyanproxy.serve.limits import BodyBudget, ConnectionCounts


def test_a_body_budget_takes_what_fits_and_gets_it_back():
    budget = BodyBudget(100)
    assert budget.take(60) and not budget.take(41) and budget.take(40)
    assert budget.held == 100
    budget.give_back(60)
    assert budget.take(60) and budget.held == 100


def test_connection_counts_per_address_with_trusted_peers_and_no_limit():
    counts = ConnectionCounts(2, parse_forward_trust("10.0.0.0/8"))
    assert counts.admit("192.0.2.1") and counts.admit("192.0.2.1") and not counts.admit("192.0.2.1")
    assert counts.admit("192.0.2.2")
    assert all(counts.admit("10.1.2.3") for _ in range(10))  # a trusted front proxy is not counted
    counts.closed("192.0.2.1")
    assert counts.admit("192.0.2.1")
    unlimited = ConnectionCounts(0, parse_forward_trust("false"))
    assert all(unlimited.admit("192.0.2.1") for _ in range(1000))
