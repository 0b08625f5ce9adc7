"""Loggers for blyanproxy's own events, filtered by ``LOG_LEVEL`` into twistd's log.

Modules get their logger from ``logger("proxy")``: a ``twisted.logger.Logger``
in the ``blyanproxy.proxy`` namespace whose events pass a level filter on their
way to the global publisher (which twistd connects to its log file or stdout).
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

from .config import LOG_LEVELS

NAMESPACE = "blyanproxy"

_PREDICATE = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_OBSERVER = FilteringLogObserver(globalLogPublisher, [_PREDICATE])


def logger(name: str) -> Logger:
    """The logger of one part of blyanproxy (``name`` such as ``"proxy"``)."""
    return Logger(namespace=f"{NAMESPACE}.{name}", observer=_OBSERVER)


def set_log_level(name: str) -> None:
    """Write blyanproxy events at ``name`` (DEBUG, INFO, WARN, ERROR) and above."""
    _PREDICATE.setLogLevelForNamespace(NAMESPACE, LOG_LEVELS[name.upper()])
