"""The node health state machine: rise/fall, ejection, cooldown doubling and expiry."""

from blyanproxy.core.healthstate import (
    DOWN,
    UNKNOWN,
    UP,
    Health,
    HealthRules,
    after_probe,
    after_traffic_failure,
    after_traffic_success,
    usable,
)

RULES = HealthRules(rise=2, fall=3, eject_after=3, cooldown=10.0, cooldown_cap=300.0)


def probes(health, results, now=0.0):
    for passed in results:
        health = after_probe(health, passed, now, RULES)
    return health


def test_first_probe_decides_an_unknown_node():
    assert Health().state == UNKNOWN and usable(Health(), 0.0)
    assert probes(Health(), [True]).state == UP
    assert probes(Health(), [False]).state == DOWN


def test_fall_needs_three_failures_in_a_row():
    health = probes(Health(), [True])
    health = probes(health, [False, False])
    assert health.state == UP
    health = probes(health, [True, False, False])
    assert health.state == UP  # the pass broke the run
    assert probes(health, [False]).state == DOWN


def test_rise_needs_two_passes_in_a_row():
    health = probes(Health(), [False])
    assert probes(health, [True]).state == DOWN
    assert probes(health, [True, False, True]).state == DOWN
    assert probes(health, [True, True]).state == UP
    assert not usable(probes(health, [True]), 0.0)


def test_a_refused_connection_ejects_at_once():
    health = after_traffic_failure(probes(Health(), [True]), "refused", 100.0, RULES)
    assert health.ejected_until == 110.0 and health.eject_reason == "refused"
    assert not usable(health, 105.0)


def test_other_failures_eject_after_a_run_of_three():
    health = probes(Health(), [True])
    health = after_traffic_failure(health, "no_response", 1.0, RULES)
    health = after_traffic_failure(health, "no_response", 2.0, RULES)
    assert usable(health, 2.0)
    health = after_traffic_success(health)
    health = after_traffic_failure(health, "no_response", 3.0, RULES)
    health = after_traffic_failure(health, "no_response", 4.0, RULES)
    assert usable(health, 4.0)  # the success broke the run
    health = after_traffic_failure(health, "no_response", 5.0, RULES)
    assert not usable(health, 5.0) and health.ejected_until == 15.0


def test_cooldown_doubles_in_a_row_up_to_the_cap_and_needs_a_probe_after_it():
    health, now, lengths = probes(Health(), [True]), 0.0, []
    for _ in range(7):
        health = after_traffic_failure(health, "refused", now, RULES)
        lengths.append(health.ejected_until - now)
        assert not usable(health, health.ejected_until - 0.1)
        now = health.ejected_until
        assert not usable(health, now)  # cooled down, but no probe has passed since
        health = after_probe(health, True, now, RULES)
        assert usable(health, now)
        now += 1
    assert lengths == [10, 20, 40, 80, 160, 300, 300]


def test_a_probe_passing_during_the_cooldown_does_not_end_it():
    health = after_traffic_failure(probes(Health(), [True]), "refused", 0.0, RULES)
    health = after_probe(health, True, 5.0, RULES)
    assert not usable(health, 11.0)
    assert usable(after_probe(health, True, 11.0, RULES), 11.0)


def test_the_doubling_starts_over_after_a_long_quiet_time():
    health = after_traffic_failure(probes(Health(), [True]), "refused", 0.0, RULES)
    health = after_probe(health, True, 10.0, RULES)
    health = after_traffic_failure(health, "refused", 1000.0, RULES)
    assert health.ejected_until == 1010.0


def test_failures_of_requests_still_in_flight_while_ejected_do_not_count():
    health = after_traffic_failure(probes(Health(), [True]), "refused", 0.0, RULES)
    for when in (1.0, 2.0, 3.0):
        health = after_traffic_failure(health, "no_response", when, RULES)
    health = after_probe(health, True, 11.0, RULES)  # readmitted
    health = after_traffic_failure(health, "no_response", 12.0, RULES)
    assert usable(health, 12.0)  # one failure after coming back is not an ejection


def test_a_node_flapping_at_the_cap_stays_at_the_cap():
    health, now = probes(Health(), [True]), 0.0
    for _ in range(6):
        health = after_traffic_failure(health, "refused", now, RULES)
        now = health.ejected_until
        health = after_probe(health, True, now, RULES)
    assert health.ejected_until - health.last_ejected == 300
    health = after_traffic_failure(health, "refused", now + 6, RULES)
    assert health.ejected_until - (now + 6) == 300
