"""Pure rules of the per-key workloads cache: when to serve, refuse, fetch, refresh or forget.

A ``KeyState`` is what the proxy knows of one API key's workloads; the
functions here decide from it and ``now`` alone, so every timing rule is a
plain function to test. ``discovery.WorkloadDirectory`` applies them.
"""

from __future__ import annotations

import attrs

#: What to do with a request for a key.
SERVE = "serve"  # answer from the cached list
FETCH = "fetch"  # ask the API, then decide again
REJECTED = "rejected"  # the API refused the key a moment ago: 401
UNAVAILABLE = "unavailable"  # the API failed and nothing recent enough is cached: 502

#: How a fetch ended.
FETCHED = "fetched"
KEY_REFUSED = "key_refused"
FAILED = "failed"


@attrs.frozen
class CacheLimits:
    """The cache's durations, in seconds.

    ``refresh``: age at which the background loop asks again for a key in use.
    ``idle``: unused this long with nothing in flight, a key is forgotten.
    ``negative_ttl``: an answer with no running workload, or a failed call with
    nothing to serve, is remembered this long (no API call meanwhile).
    ``rejected_ttl``: a key the API refused is refused this long without a call.
    ``stale_max``: while the API fails, a list this old is still served.
    """

    refresh: float = 60.0
    idle: float = 180.0
    negative_ttl: float = 5.0
    rejected_ttl: float = 30.0
    stale_max: float = 300.0


@attrs.frozen
class KeyState:
    """What is known of one key: its last list, when it came, and how the last call ended.

    ``workloads`` are as the API listed them; ``nodes`` are the routable nodes
    of the usable ones (``workloads.workload_nodes``).
    """

    workloads: tuple = ()
    nodes: tuple = ()
    fetched_at: float | None = None
    checked_at: float | None = None
    last_outcome: str | None = None


def decide(state: KeyState, now: float, limits: CacheLimits, may_fetch: bool = True) -> str:
    """What to do with a request for this key at ``now``.

    Without ``may_fetch`` (a fetch for this request just ended) the answer is
    never ``FETCH``: what could not be served is ``UNAVAILABLE``.
    """
    if state.checked_at is None:
        return FETCH if may_fetch else UNAVAILABLE
    since_check = now - state.checked_at
    if state.last_outcome == KEY_REFUSED:
        return REJECTED if since_check < limits.rejected_ttl or not may_fetch else FETCH
    fresh_enough = state.fetched_at is not None and now - state.fetched_at <= limits.stale_max
    if fresh_enough and (state.nodes or since_check < limits.negative_ttl or not may_fetch):
        return SERVE
    if may_fetch and not (state.last_outcome == FAILED and since_check < limits.negative_ttl):
        return FETCH
    return UNAVAILABLE


def after_fetch(state: KeyState, outcome: str, now: float,
                workloads: tuple = (), nodes: tuple = ()) -> KeyState:
    """The state after a call to the API ended with ``outcome``.

    A refused key loses its list at once; a failed call keeps the old list
    (served while ``decide`` allows).
    """
    if outcome == FETCHED:
        return KeyState(workloads=workloads, nodes=nodes, fetched_at=now, checked_at=now, last_outcome=FETCHED)
    if outcome == KEY_REFUSED:
        return KeyState(checked_at=now, last_outcome=KEY_REFUSED)
    return attrs.evolve(state, checked_at=now, last_outcome=FAILED)


def is_known(state: KeyState) -> bool:
    """Whether the API has listed this key's workloads: its calls are known work, not first lookups.

    A key the API refused last is not known (it may be a guess).
    """
    return state.fetched_at is not None


def refresh_due(state: KeyState, now: float, limits: CacheLimits) -> bool:
    """Whether the background loop should ask again: a key with a list, last asked ``refresh`` ago.

    Keys the API refused or never answered are asked again only on demand,
    so unknown keys cannot make the proxy poll the API.
    """
    return (
        state.fetched_at is not None
        and state.checked_at is not None
        and state.last_outcome != KEY_REFUSED
        and now - state.checked_at >= limits.refresh
    )


def is_idle(last_used: float, in_flight: int, now: float, limits: CacheLimits) -> bool:
    """Whether a key can be forgotten: unused for ``idle`` seconds and nothing in flight."""
    return in_flight == 0 and now - last_used >= limits.idle


def node_changes(before: tuple, after: tuple) -> tuple[list, list]:
    """``(joined, left)`` node names between two node lists (for the log)."""
    old = {node.name for node in before}
    new = {node.name for node in after}
    return sorted(new - old), sorted(old - new)
