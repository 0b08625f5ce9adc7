"""Loggers for blyanproxy's own events, filtered by ``LOG_LEVEL``, and the ``LOG_FORMAT=json`` log.

Modules get their logger from ``logger("proxy")``: a ``twisted.logger.Logger``
in the ``blyanproxy.proxy`` namespace whose events pass a level filter on their
way to the global publisher, where twistd's log observer writes them with
Twisted's own events.

With ``LOG_FORMAT=json`` that observer is ``JsonLinesObserver``: every event on
standard output, Twisted's included, is one flat JSON object on one line
(``json_event``): ``time`` (RFC 3339, UTC), ``level`` (a word), ``namespace``,
the rendered ``message``, then the event's own fields. ``choose_process_log``
asks twistd (or ``twist``) for it while the command line is read, so twistd's
text observer never writes to standard output too.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import MutableMapping
from datetime import datetime, timezone
from typing import Any, Callable, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
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

_PREDICATE = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_OBSERVER = FilteringLogObserver(globalLogPublisher, [_PREDICATE])


def logger(name: str) -> Logger:
    """The logger of one part of blyanproxy (``name`` such as ``"proxy"``)."""
    return Logger(namespace=f"{NAMESPACE}.{name}", observer=_OBSERVER)


def debugging(name: str) -> bool:
    """Whether DEBUG events of ``logger(name)`` are written now: callers skip building costly fields when not."""
    return _written(f"{NAMESPACE}.{name}", LogLevel.debug)


#: Whether events of a namespace at a level are written, as last worked out (cleared when the level changes).
_WRITTEN: dict[tuple[str, LogLevel], bool] = {}


def _written(namespace: str, level: LogLevel) -> bool:
    written = _WRITTEN.get((namespace, level))
    if written is None:
        written = _WRITTEN[namespace, level] = _PREDICATE.logLevelForNamespace(namespace) <= level
    return written


def set_log_level(name: str) -> None:
    """Write blyanproxy events at ``name`` (DEBUG, INFO, WARN, ERROR) and above."""
    _PREDICATE.setLogLevelForNamespace(NAMESPACE, LOG_LEVELS[name.upper()])
    _WRITTEN.clear()


def log_info_line(log: Logger, line: str, fields: Callable[[], dict[str, object]]) -> None:
    """Log the INFO event whose message is ``line`` (taken as it is) and whose fields are ``fields()``.

    When the process log is a ``ClassicTextObserver`` (twistd's text log on
    standard output) the line is written to it straight, in the same format,
    without building an event: the access log's way, once per request.
    """
    direct = _DIRECT_TEXT
    if direct is not None:
        if not _written(log.namespace, LogLevel.info):
            return
        try:
            direct.write_line(log.namespace, line)
            return
        except (OSError, ValueError):  # standard output broke (EPIPE, ENOSPC, closed): no more direct lines
            _stop_direct_lines()
    log.info(line.replace("{", "{{").replace("}", "}}"), **fields())  # the line is the event's format


def _stop_direct_lines() -> None:
    """Write every line as a log event from now on (the observers' errors are the publisher's to handle)."""
    global _DIRECT_TEXT
    _DIRECT_TEXT = None


# -- twistd's text log ------------------------------------------------------------------------------


@implementer(ILogObserver)
class ClassicTextObserver:
    """Writes every event to ``stream`` as twistd's text log does (``textFileLogObserver``), cheaper.

    The time stamp (``2026-05-01T12:00:00+0000``, local time) is formatted
    once a second, not once an event; ``write_line`` writes an INFO line
    built elsewhere with one ``write``.
    """

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.time) -> None:
        self._stream = stream
        self._clock = clock
        self._second: int | None = None
        self._stamp = "-"

    def _time_text(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(when, timeFormatRFC3339)
        return self._stamp

    def __call__(self, event: LogEvent) -> None:
        """Write ``event`` in twistd's format and flush."""
        text = formatEventAsClassicLogText(event, formatTime=self._time_text)
        if text:
            self._stream.write(text)
            self._stream.flush()

    def write_line(self, namespace: str, line: str) -> None:
        """Write the INFO event of ``namespace`` whose message is ``line`` (one line, no newline) and flush."""
        self._stream.write(f"{self._time_text(self._clock())} [{namespace}#info] {line}\n")
        self._stream.flush()


#: The process log when it is a ``ClassicTextObserver`` (``log_info_line`` writes to it straight).
_DIRECT_TEXT: ClassicTextObserver | None = None


def text_stdout_observer() -> ClassicTextObserver:
    """twistd's ``--logger`` factory for its text log on standard output (``log_info_line`` writes to it)."""
    global _DIRECT_TEXT
    _DIRECT_TEXT = ClassicTextObserver(sys.stdout)
    return _DIRECT_TEXT


# -- LOG_FORMAT=json -------------------------------------------------------------------------------

#: The keys every JSON line starts with; an event field of the same name gets a ``_`` after it.
RESERVED = ("time", "level", "namespace", "message")

#: Keys of a twisted.python.log event that repeat its message, time, level or failure.
_LEGACY_REPEATS = frozenset({"message", "format", "time", "isError", "system", "failure", "why"})


def rfc3339(timestamp: float | None) -> str | None:
    """An epoch time as RFC 3339 text in UTC, to the millisecond (``2026-05-01T12:00:00.250Z``)."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_safe(value: object) -> object:
    """``value`` when JSON can hold it as it is, else its ``repr``."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    return value


def json_event(event: LogEvent) -> dict[str, object]:
    """The flat JSON object of a Twisted log event (see the module docstring).

    Twisted's bookkeeping (``log_*`` keys) is left out, and so are the keys of a
    twisted.python.log event that only repeat its message. A failure's
    traceback is in ``traceback``; a value JSON cannot hold is given as its ``repr``.
    """
    level = event.get("log_level")
    namespace = event.get("log_namespace", "-")
    record: dict[str, object] = {
        "time": rfc3339(event.get("log_time")),
        "level": getattr(level, "name", None) or "info",
        "namespace": namespace,
        "message": formatEvent(event),
    }
    legacy = namespace == "log_legacy"
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY_REPEATS):
            continue
        record[key + "_" if key in RESERVED else key] = value
    system = event.get("log_system")
    if system not in (None, "-"):
        record["system"] = system
    failure = event.get("log_failure")
    if failure is not None and not legacy:  # a legacy event's message holds its traceback already
        record["traceback"] = failure.getTraceback()
    return record


def json_line(event: LogEvent) -> str:
    """``json_event(event)`` as one line of JSON text (ASCII: any other character is escaped)."""
    record = json_event(event)
    try:
        return json.dumps(record, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return json.dumps({key: _json_safe(value) for key, value in record.items()})


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes every event to ``stream`` as one flat JSON object per line (``json_line``)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        """Write ``event``'s line and flush it."""
        self._stream.write(json_line(event) + "\n")
        self._stream.flush()


def json_stdout_observer() -> JsonLinesObserver:
    """twistd's ``--logger`` factory for ``LOG_FORMAT=json``: JSON lines on standard output."""
    return JsonLinesObserver(sys.stdout)


#: The ``--logger`` values ``choose_process_log`` gives twistd.
TWISTD_JSON_LOGGER = f"{__name__}.json_stdout_observer"
TWISTD_TEXT_LOGGER = f"{__name__}.text_stdout_observer"


def choose_process_log(runner: MutableMapping[str, Any] | None, log_format: str) -> None:
    """Have the runner's own log on standard output written by our observer: JSON lines for
    ``log_format`` ``json``, else twistd's text format (``ClassicTextObserver``).

    ``runner`` is the parsed options of the program running the plugin (the
    plugin options' ``parent``): twistd's, which take a ``--logger`` factory
    (used when the log goes to standard output: ``--nodaemon`` without
    ``--logfile``, or ``--logfile=-``, no ``--syslog`` and no ``--logger`` of
    the operator's), or twist's, which take a ``fileLogObserverFactory``.
    Others are left alone, and so is a log file twistd writes itself.
    """
    if runner is None:
        return
    json_log = log_format == "json"
    if "logger" in runner:
        # A daemon's standard output is /dev/null: twistd itself refuses --logfile=- without -n.
        on_stdout = runner.get("nodaemon") and runner.get("logfile") in (None, "", "-")
        if runner["logger"] is None and on_stdout and not runner.get("syslog"):
            runner["logger"] = TWISTD_JSON_LOGGER if json_log else TWISTD_TEXT_LOGGER
    elif "fileLogObserverFactory" in runner and json_log:
        # twist keeps its own text observer, behind its own --log-level filter.
        runner["fileLogObserverFactory"] = JsonLinesObserver
