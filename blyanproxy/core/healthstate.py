"""The health state machine of one node, as pure transitions over a frozen value.

Two kinds of evidence move it:

- **Active probes** (``after_probe``): rise/fall thresholds, so one probe never
  flips a known state. A node never probed yet takes the first result as is.
- **Real traffic** (``after_traffic_failure``/``after_traffic_success``): a run
  of failures (or one refused connection) ejects the node for a cooldown that
  doubles with each ejection in a row, up to a cap. After the cooldown the node
  comes back only with a passing probe.

A node whose engine says it is still loading its model is ``loading``
(``after_loading``): not usable, and not a failure either.

``usable(state, now)`` is what selection asks. Nothing here reads a clock:
``now`` is passed in.
"""

from __future__ import annotations

import attrs

UNKNOWN = "unknown"
UP = "up"
DOWN = "down"
LOADING = "loading"

#: Traffic failures that eject at once: the node is not even accepting connections.
IMMEDIATE_EJECTION = frozenset({"refused"})


@attrs.frozen
class HealthRules:
    """Thresholds of the state machine (seconds for durations)."""

    rise: int = 2
    fall: int = 3
    eject_after: int = 3
    cooldown: float = 10.0
    cooldown_cap: float = 300.0


@attrs.frozen
class Health:
    """What is known of one node's health."""

    state: str = UNKNOWN
    passes: int = 0  # consecutive passing probes
    fails: int = 0  # consecutive failing probes
    traffic_failures: int = 0  # consecutive failed attempts from real traffic
    ejected_until: float | None = None
    ejections: int = 0  # ejections in a row (the cooldown doubles with each)
    last_ejected: float | None = None
    eject_reason: str | None = None
    probe_needed: bool = False  # ejected: a passing probe must come before traffic
    last_check: float | None = None
    last_error: str | None = None


def after_probe(health: Health, passed: bool, now: float, rules: HealthRules, error: str | None = None) -> Health:
    """The state after one probe."""
    if passed:
        passes, fails = health.passes + 1, 0
        state = UP if health.state in (UNKNOWN, LOADING) or passes >= rules.rise else health.state
        # Only a probe that passes after the cooldown lets an ejected node back, with a clean slate.
        probe_needed = health.probe_needed and not cooled_down(health, now)
        readmitted = health.probe_needed and not probe_needed
        return attrs.evolve(
            health, state=state, passes=passes, fails=fails, last_check=now, last_error=None,
            probe_needed=probe_needed,
            traffic_failures=0 if readmitted else health.traffic_failures,
        )
    passes, fails = 0, health.fails + 1
    state = DOWN if health.state == UNKNOWN or fails >= rules.fall else health.state
    return attrs.evolve(health, state=state, passes=passes, fails=fails, last_check=now, last_error=error)


def after_loading(health: Health, now: float) -> Health:
    """The state after a probe answered that the node is still loading its model."""
    return attrs.evolve(health, state=LOADING, passes=0, fails=0, last_check=now, last_error="loading")


def cooled_down(health: Health, now: float) -> bool:
    """True when no ejection holds the node out at ``now``."""
    return health.ejected_until is None or now >= health.ejected_until


def after_traffic_failure(health: Health, reason: str, now: float, rules: HealthRules) -> Health:
    """The state after a request failed on this node before any byte reached the client."""
    if not cooled_down(health, now) or health.probe_needed:
        return health  # already out: what was still in flight when it left does not count
    failures = health.traffic_failures + 1
    if reason not in IMMEDIATE_EJECTION and failures < rules.eject_after:
        return attrs.evolve(health, traffic_failures=failures)
    in_a_row = health.ejections
    if health.ejected_until is not None and now - health.ejected_until > rules.cooldown_cap:
        in_a_row = 0  # back and well for longer than the longest cooldown: start over
    cooldown = min(rules.cooldown * (2 ** in_a_row), rules.cooldown_cap)
    return attrs.evolve(
        health,
        traffic_failures=0,
        ejected_until=now + cooldown,
        ejections=in_a_row + 1,
        last_ejected=now,
        eject_reason=reason,
        probe_needed=True,
    )


def after_traffic_success(health: Health) -> Health:
    """The state after the node answered a request."""
    if health.traffic_failures == 0:
        return health
    return attrs.evolve(health, traffic_failures=0)


def usable(health: Health, now: float) -> bool:
    """Whether selection may send traffic to the node at ``now``."""
    return health.state not in (DOWN, LOADING) and cooled_down(health, now) and not health.probe_needed


def readmit_after_cooldown(health: Health, now: float) -> Health:
    """For nodes nobody probes: once the cooldown is over, an ejected node may take traffic again.

    Its ejection count stays, so failing again ejects it for twice as long.
    """
    if health.probe_needed and cooled_down(health, now):
        return attrs.evolve(health, probe_needed=False, traffic_failures=0)
    return health
