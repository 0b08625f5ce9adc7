"""Loggers for blyanproxy's own events, filtered by ``LOG_LEVEL`` into twistd's log.

Modules get their logger from ``logger("proxy")``: a ``twisted.logger.Logger``
in the ``blyanproxy.proxy`` namespace whose events pass a level filter on their
way to the global publisher (which twistd connects to its log file or stdout).
With ``LOG_FORMAT=json`` they go to standard output as JSON lines instead, one
object per event, for log shippers; Twisted's own lines stay in twistd's log.
"""

from __future__ import annotations

import sys
from typing import TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
)
from zope.interface import implementer

NAMESPACE = "blyanproxy"

#: The ``LOG_LEVEL`` words and the Twisted levels they stand for.
LOG_LEVELS = {
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARN": LogLevel.warn,
    "WARNING": LogLevel.warn,
    "ERROR": LogLevel.error,
}


@implementer(ILogObserver)
class _Destination:
    """Where events that pass the level filter go; switchable at start-up."""

    def __init__(self) -> None:
        self.target: ILogObserver = globalLogPublisher

    def __call__(self, event: LogEvent) -> None:
        """Pass ``event`` on to the current target."""
        self.target(event)


_PREDICATE = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_DESTINATION = _Destination()
_OBSERVER = FilteringLogObserver(_DESTINATION, [_PREDICATE])


def logger(name: str) -> Logger:
    """The logger of one part of blyanproxy (``name`` such as ``"proxy"``)."""
    return Logger(namespace=f"{NAMESPACE}.{name}", observer=_OBSERVER)


def debugging(name: str) -> bool:
    """Whether DEBUG events of ``logger(name)`` are written now: callers skip building costly fields when not."""
    return _PREDICATE.logLevelForNamespace(f"{NAMESPACE}.{name}") <= LogLevel.debug


def set_log_level(name: str) -> None:
    """Write blyanproxy events at ``name`` (DEBUG, INFO, WARN, ERROR) and above."""
    _PREDICATE.setLogLevelForNamespace(NAMESPACE, LOG_LEVELS[name.upper()])


def set_log_format(name: str, stream: TextIO | None = None) -> None:
    """``text``: into twistd's log; ``json``: JSON lines on ``stream`` (standard output by default)."""
    if name == "json":
        _DESTINATION.target = jsonFileLogObserver(stream or sys.stdout, recordSeparator="")
    else:
        _DESTINATION.target = globalLogPublisher
