"""The attempt machine as a playbook: events in, decisions out, no sockets and no clock."""

import pytest

from blyanproxy.core import (
    BAD_RESPONSE,
    CONNECT_FAILED,
    CONNECT_TIMEOUT,
    NO_RESPONSE,
    REFUSED,
    RESPONSE_TIMEOUT,
    TLS_FAILED,
    UPGRADE_TIMEOUT,
    AttemptRules,
    Attempts,
    GiveUp,
    Pick,
    ProxyError,
    Relay,
    Try,
    bad_handshake,
    no_node_error,
)


def shape(error: ProxyError) -> tuple:
    """What a client sees of an error (ProxyError, an exception, compares by identity)."""
    return error.status, error.code, error.message, error.retry_after


RULES = AttemptRules(max_attempts=3, retry_delay=0.0, retry_on_status=frozenset({502, 503}), health_interval=5.0)


def test_the_first_attempt_asks_the_pool_for_any_node():
    attempts = Attempts(RULES)
    assert attempts.start() == Pick(frozenset())
    assert attempts.picked("a") == Try("a", 1)
    assert attempts.count == 1


def test_no_node_at_all_is_503_with_retry_after_the_next_health_check():
    attempts = Attempts(AttemptRules(health_interval=2.2))
    attempts.start()
    decision = attempts.picked(None)
    assert isinstance(decision, GiveUp) and decision.failed is None
    assert shape(decision.error) == (503, "no_healthy_nodes", "no healthy node can take the request", 3)
    assert no_node_error(0.1).retry_after == 1


def test_failures_fail_over_to_untried_nodes_until_max_attempts_then_give_up_with_the_last_error():
    attempts = Attempts(RULES)
    attempts.start()
    attempts.picked("a")
    assert attempts.failed(REFUSED) == Pick(frozenset({"a"}), failed="refused")
    assert attempts.picked("b") == Try("b", 2)
    assert attempts.failed(CONNECT_TIMEOUT) == Pick(frozenset({"a", "b"}), failed="connect_timeout")
    assert attempts.picked("c") == Try("c", 3)
    assert attempts.failed(NO_RESPONSE) == GiveUp(NO_RESPONSE.error, failed="no_response")
    assert attempts.count == 3


def test_when_the_pool_runs_out_of_nodes_the_last_failure_is_the_answer():
    attempts = Attempts(RULES)
    attempts.start()
    attempts.picked("a")
    attempts.failed(CONNECT_TIMEOUT)
    decision = attempts.picked(None)
    assert isinstance(decision, GiveUp) and decision.failed is None  # held against "a" when it failed
    assert shape(decision.error) == (504, "upstream_timeout", "connecting to the node timed out", None)


def test_failing_over_waits_retry_delay():
    attempts = Attempts(AttemptRules(max_attempts=2, retry_delay=0.25))
    attempts.start()
    attempts.picked("a")
    assert attempts.failed(REFUSED) == Pick(frozenset({"a"}), delay=0.25, failed="refused")


def test_giving_up_does_not_wait_retry_delay():
    attempts = Attempts(AttemptRules(max_attempts=1, retry_delay=0.25))
    attempts.start()
    attempts.picked("a")
    assert attempts.failed(REFUSED) == GiveUp(REFUSED.error, failed="refused")


def test_a_stale_kept_alive_connection_is_replaced_once_on_the_same_node_and_not_held_against_it():
    attempts = Attempts(RULES)
    attempts.start()
    attempts.picked("a")
    assert attempts.failed(NO_RESPONSE, reused=True, bytes_received=0) == Try("a", 1, fresh=True)
    assert attempts.count == 1
    # The fresh connection failing too is the node's doing.
    assert attempts.failed(NO_RESPONSE, reused=True, bytes_received=0) == Pick(frozenset({"a"}),
                                                                                failed="no_response")


def test_a_reused_connection_that_had_started_answering_is_not_stale():
    attempts = Attempts(RULES)
    attempts.start()
    attempts.picked("a")
    assert attempts.failed(BAD_RESPONSE, reused=True, bytes_received=12) == Pick(frozenset({"a"}),
                                                                                   failed="bad_response")


def test_the_fresh_reconnect_is_spent_once_per_request_not_per_node():
    attempts = Attempts(RULES)
    attempts.start()
    attempts.picked("a")
    attempts.failed(NO_RESPONSE, reused=True)
    attempts.failed(NO_RESPONSE)
    attempts.picked("b")
    assert attempts.failed(NO_RESPONSE, reused=True) == Pick(frozenset({"a", "b"}), failed="no_response")


@pytest.mark.parametrize("status", [200, 404, 500])
def test_other_statuses_are_relayed(status):
    attempts = Attempts(RULES)
    attempts.start()
    attempts.picked("a")
    assert attempts.answered(status) == Relay()


def test_a_retry_status_fails_over_at_once_when_another_node_is_free():
    attempts = Attempts(AttemptRules(retry_delay=1.0, retry_on_status=frozenset({503})))
    attempts.start()
    attempts.picked("a")
    assert attempts.answered(503) == Pick(frozenset({"a"}))  # no delay: the answer is waiting
    assert attempts.picked("b") == Try("b", 2, failed="status_503")
    assert attempts.answered(200) == Relay()


def test_a_retry_status_is_relayed_when_no_other_node_is_free():
    attempts = Attempts(RULES)
    attempts.start()
    attempts.picked("a")
    assert attempts.answered(502) == Pick(frozenset({"a"}))
    assert attempts.picked(None) == Relay()
    # Nothing was held against "a": its answer went to the client.


def test_a_retry_status_on_the_last_attempt_is_relayed():
    attempts = Attempts(AttemptRules(max_attempts=2, retry_on_status=frozenset({503})))
    attempts.start()
    attempts.picked("a")
    attempts.answered(503)
    attempts.picked("b")
    assert attempts.answered(503) == Relay()


def test_after_a_status_failover_the_pool_running_dry_gives_up_with_the_last_failure():
    attempts = Attempts(RULES)
    attempts.start()
    attempts.picked("a")
    attempts.failed(REFUSED)
    attempts.picked("b")
    attempts.answered(503)
    attempts.picked("c")
    assert attempts.failed(CONNECT_TIMEOUT) == GiveUp(CONNECT_TIMEOUT.error, failed="connect_timeout")


def test_an_unusable_answer_gives_up_without_failover():
    attempts = Attempts(RULES)
    attempts.start()
    attempts.picked("a")
    decision = attempts.unusable(bad_handshake("the node's handshake answer is too large"))
    assert isinstance(decision, GiveUp) and decision.failed == "bad_handshake"
    assert shape(decision.error) == (502, "upstream_failed", "the node's handshake answer is too large", None)


def test_the_table_of_attempt_failures():
    table = {failure.reason + ("/upgrade" if failure is UPGRADE_TIMEOUT else ""): shape(failure.error)
             for failure in (CONNECT_TIMEOUT, REFUSED, CONNECT_FAILED, BAD_RESPONSE, TLS_FAILED, NO_RESPONSE,
                             RESPONSE_TIMEOUT, UPGRADE_TIMEOUT)}
    assert table == {
        "connect_timeout": (504, "upstream_timeout", "connecting to the node timed out", None),
        "refused": (502, "upstream_unreachable", "the node refused the connection", None),
        "connect_failed": (502, "upstream_unreachable", "the node could not be reached", None),
        "bad_response": (502, "upstream_failed", "the node's answer is not valid HTTP", None),
        "tls_failed": (502, "upstream_tls", "the TLS handshake with the node failed", None),
        "no_response": (502, "upstream_failed", "the node closed the connection without answering", None),
        "response_timeout": (504, "upstream_timeout", "the node did not answer in time", None),
        "response_timeout/upgrade": (504, "upstream_timeout", "the node did not answer the upgrade in time", None),
    }
