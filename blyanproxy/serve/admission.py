"""Admission from the settings: the slot queue, the rate limits and their overrides file, and SIGHUP.

``build_admission`` makes the data path's ``forward.Admission`` from
``QUEUE_MAX``, ``QUEUE_TIMEOUT_MS``, ``RATE_LIMIT_RPM``/``TPM`` and
``RATE_LIMIT_FILE``, and hooks the pools to it (``NODE_MAX_INFLIGHT``, and
every lease given back wakes the queue). ``AdmissionSettings.apply`` is what
SIGHUP runs: the caps' default, the limits and the overrides file are read
again (a file that cannot be used changes nothing, and the log says why).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from blyanproxy.config import Settings
from blyanproxy.core import RateLimit, RateLimiter, parse_overrides
from blyanproxy.fleet import LeaseMaker, QueueObserver, SlotQueue
from blyanproxy.forward import Admission
from blyanproxy.logs import logger

log = logger("admission")


def read_rate_limits(path: str) -> dict[str, RateLimit]:
    """The per-key limits in the overrides file (``OSError`` or ``ValueError`` when unusable)."""
    with open(path, encoding="utf-8") as file:
        return parse_overrides(json.load(file))


def default_limit(settings: Settings) -> RateLimit:
    """``RATE_LIMIT_RPM`` and ``RATE_LIMIT_TPM`` (0: no limit)."""
    return RateLimit(settings.rate_limit_rpm or None, settings.rate_limit_tpm or None)


class AdmissionSettings:
    """Keeps the admission objects in step with the settings (at start and on SIGHUP)."""

    def __init__(self, admission: Admission, pools: Sequence[LeaseMaker]) -> None:
        self.admission = admission
        self._pools = pools

    def apply(self, settings: Settings) -> bool:
        """Apply the caps' default and the rate limits; False when the overrides file is unusable."""
        for pool in self._pools:
            pool.default_cap = settings.node_max_inflight or None
        limiter = self.admission.limiter
        limiter.default = default_limit(settings)
        if settings.rate_limit_file is None:
            limiter.overrides = {}
            return True
        try:
            limiter.overrides = read_rate_limits(settings.rate_limit_file)
        except (OSError, ValueError) as problem:
            log.error("RATE_LIMIT_FILE {path}: {problem}; the limits stay as they were",
                      path=settings.rate_limit_file, problem=str(problem))
            return False
        log.info("rate limits: {count} per-key override(s) from {path}", count=len(limiter.overrides),
                 path=settings.rate_limit_file)
        return True


def build_admission(settings: Settings, clock: IReactorTime, pools: Sequence[LeaseMaker],
                    observer: QueueObserver | None) -> AdmissionSettings:
    """The admission objects for ``settings``, hooked to ``pools``; ``ValueError`` for a bad overrides file."""
    queue = SlotQueue(clock, settings.queue_max, settings.queue_timeout, observer)
    key_header = settings.caller_key_header.encode("ascii") if settings.caller_key_header else None
    admission = Admission(clock, queue, RateLimiter(default_limit(settings)), key_header)
    for pool in pools:
        pool.on_slot_freed = queue.slot_freed
    keeper = AdmissionSettings(admission, pools)
    if settings.rate_limit_file is not None:
        admission.limiter.overrides = read_rate_limits(settings.rate_limit_file)
    keeper.apply(settings)
    return keeper
