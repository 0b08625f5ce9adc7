"""LOG_LEVEL decides which of blyanproxy's events reach twistd's log; LOG_FORMAT=json writes them as JSON lines."""

import io
import json
import math

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny

from blyanproxy import logs
from blyanproxy.logs import (
    TWISTD_JSON_LOGGER,
    TWISTD_TEXT_LOGGER,
    ClassicTextObserver,
    JsonLinesObserver,
    choose_process_log,
    debugging,
    json_event,
    json_line,
    log_info_line,
    logger,
    set_log_level,
)


@pytest.fixture
def captured():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
    set_log_level("INFO")


@pytest.mark.parametrize(
    "level, written",
    [
        ("DEBUG", ["debug", "info", "warn", "error"]),
        ("INFO", ["info", "warn", "error"]),
        ("WARN", ["warn", "error"]),
        ("ERROR", ["error"]),
    ],
)
def test_level_filters_events(captured, level, written):
    set_log_level(level)
    log = logger("test")
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    mine = [e["log_level"].name for e in captured if e.get("log_namespace") == "blyanproxy.test"]
    assert mine == written


def test_json_lines_are_flat_objects_with_a_rendered_message():
    stream = io.StringIO()
    observer = JsonLinesObserver(stream)
    event = {"log_format": "node {node} is {state}", "log_level": LogLevel.warn, "log_namespace": "blyanproxy.health",
             "log_time": 1767268800.25, "log_logger": object(), "log_source": None, "node": "gpu-a", "state": "up"}
    observer(event)
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line) == {"time": "2026-01-01T12:00:00.250Z", "level": "warn", "namespace": "blyanproxy.health",
                                "message": "node gpu-a is up", "node": "gpu-a", "state": "up"}


def test_values_json_cannot_hold_are_given_as_their_repr_and_reserved_names_move_aside():
    marker = object()
    line = json_line({"log_format": "{message} at {time}", "log_namespace": "x", "message": "hi", "time": 3,
                      "thing": marker, "ratio": math.nan, "keyed": {(1, 2): "pair"}, "fine": [1, "a", None]})
    shown = json.loads(line)
    assert (shown["message"], shown["message_"], shown["time_"], shown["level"]) == ("hi at 3", "hi", 3, "info")
    assert (shown["thing"], shown["ratio"], shown["keyed"]) == (repr(marker), "nan", repr({(1, 2): "pair"}))
    assert shown["fine"] == [1, "a", None]
    assert shown["time"] is None  # no log_time


def test_a_failure_carries_its_traceback():
    failure = Failure(ZeroDivisionError("division by zero"))
    shown = json_event({"log_format": "probe {node} crashed", "log_namespace": "blyanproxy.health",
                        "log_level": LogLevel.critical, "log_failure": failure, "node": "gpu-a"})
    assert shown["message"] == "probe gpu-a crashed" and shown["level"] == "critical"
    assert "ZeroDivisionError" in shown["traceback"] and "log_failure" not in shown


def test_twisted_python_log_events_keep_only_their_own_fields():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        legacy_log.msg("ProxySite starting on 9000")
        legacy_log.msg(format="%(count)d connections", count=3, system="ProxySite,0,127.0.0.1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    first, second = (json_event(event) for event in events[-2:])
    assert {key: first[key] for key in first if key != "time"} == {
        "level": "info", "namespace": "log_legacy", "message": "ProxySite starting on 9000"}
    assert (second["message"], second["count"], second["system"]) == ("3 connections", 3, "ProxySite,0,127.0.0.1")


@pytest.mark.parametrize("runner, log_format, expected", [
    ({"logger": None, "logfile": None, "nodaemon": True}, "json", TWISTD_JSON_LOGGER),
    ({"logger": None, "logfile": "-", "nodaemon": True}, "json", TWISTD_JSON_LOGGER),
    ({"logger": None, "logfile": "-", "nodaemon": False}, "json", None),
    ({"logger": None, "logfile": "proxy.log", "nodaemon": True}, "json", None),  # the log is not on stdout
    ({"logger": None, "logfile": None, "nodaemon": False}, "json", None),  # a daemon's twistd.log
    ({"logger": "my.observer", "logfile": None, "nodaemon": True}, "json", "my.observer"),  # the operator's
    ({"logger": None, "logfile": None, "nodaemon": True}, "text", TWISTD_TEXT_LOGGER),
    ({"logger": None, "logfile": "-", "nodaemon": False}, "text", None),  # twistd refuses a daemon on stdout
    ({"logger": None, "logfile": "-", "nodaemon": True}, "text", TWISTD_TEXT_LOGGER),
    ({"logger": None, "logfile": "proxy.log", "nodaemon": True}, "text", None),  # twistd writes its own file
    ({"logger": None, "logfile": None, "nodaemon": True, "syslog": True}, "json", None),  # to syslog
    ({"logger": None, "logfile": None, "nodaemon": True, "syslog": True}, "text", None),
])
def test_twistd_is_given_our_logger_when_its_log_is_on_standard_output(runner, log_format, expected):
    choose_process_log(runner, log_format)
    assert runner["logger"] == expected


def test_twist_is_given_our_observer_and_a_lone_options_object_is_left_alone():
    runner = {"fileLogObserverFactory": object()}
    choose_process_log(runner, "json")
    assert runner["fileLogObserverFactory"] is JsonLinesObserver
    own = object()
    runner = {"fileLogObserverFactory": own}
    choose_process_log(runner, "text")
    assert runner["fileLogObserverFactory"] is own  # twist's own choice (and --log-level filter) stays
    choose_process_log(None, "json")


def test_the_twistd_logger_name_is_the_json_observer_factory():
    assert isinstance(namedAny(TWISTD_JSON_LOGGER)(), JsonLinesObserver)


def test_debugging_follows_the_level():
    try:
        set_log_level("DEBUG")
        assert debugging("balancer")
        set_log_level("INFO")
        assert not debugging("balancer")
    finally:
        set_log_level("INFO")


def classic_events():
    """Events of every shape the text log meets: fields, braces, a legacy one, a failure, no time."""
    failure = Failure(ZeroDivisionError("division by zero"))
    return [
        {"log_format": "node {name} is {state}", "name": "n0", "state": "up", "log_level": LogLevel.info,
         "log_namespace": "blyanproxy.health", "log_time": 1767225600.75},
        {"log_format": "a {{literal}} brace", "log_level": LogLevel.warn, "log_namespace": "blyanproxy.x",
         "log_time": 1767225601.0, "log_system": "ProxySite,0,127.0.0.1"},
        {"log_format": "it broke", "log_level": LogLevel.error, "log_namespace": "blyanproxy.x",
         "log_time": 1767225601.5, "log_failure": failure},
        {"log_format": "two\nlines", "log_level": LogLevel.info, "log_namespace": "blyanproxy.x",
         "log_time": None},
        {"log_format": "", "log_level": LogLevel.info, "log_namespace": "blyanproxy.x", "log_time": 1.0},
    ]


def test_the_text_observer_writes_exactly_what_twistds_own_does():
    from twisted.logger import textFileLogObserver

    ours, theirs = io.StringIO(), io.StringIO()
    observer, twistds = ClassicTextObserver(ours), textFileLogObserver(theirs)
    for event in classic_events():
        observer(dict(event))
        twistds(dict(event))
    assert ours.getvalue() == theirs.getvalue()
    assert ours.getvalue().count("\n") >= 6 and "Traceback" in ours.getvalue()


def test_a_direct_line_reads_as_the_same_info_event_would(monkeypatch):
    from twisted.logger import textFileLogObserver

    moment = [1767225600.25]
    direct, theirs = io.StringIO(), io.StringIO()
    observer = ClassicTextObserver(direct, clock=lambda: moment[0])
    monkeypatch.setattr(logs, "_DIRECT_TEXT", observer)
    access = logger("access")
    log_info_line(access, "127.0.0.1 GET /x?{a}=… status=200", lambda: {"status": 200})
    moment[0] += 1.0  # the next second: the stamp is formatted anew
    log_info_line(access, "second line", lambda: {})
    for line, at in (("127.0.0.1 GET /x?{{a}}=… status=200", 1767225600.25), ("second line", 1767225601.25)):
        textFileLogObserver(theirs)({"log_format": line, "log_level": LogLevel.info,
                                     "log_namespace": "blyanproxy.access", "log_time": at})
    assert direct.getvalue() == theirs.getvalue()


def test_a_direct_line_follows_the_level_and_without_the_observer_is_an_event(monkeypatch, captured):
    direct = io.StringIO()
    monkeypatch.setattr(logs, "_DIRECT_TEXT", ClassicTextObserver(direct))
    access = logger("access")
    set_log_level("WARN")
    log_info_line(access, "not written", lambda: {})
    set_log_level("INFO")
    log_info_line(access, "written", lambda: {})
    assert direct.getvalue().endswith(" [blyanproxy.access#info] written\n") and "not written" not in direct.getvalue()
    assert captured == []  # written straight, not as an event
    monkeypatch.setattr(logs, "_DIRECT_TEXT", None)
    log_info_line(access, "as an {event}", lambda: {"status": 200})
    assert [(formatEvent(e), e["status"]) for e in captured] == [("as an {event}", 200)]


def test_the_twistd_text_logger_name_is_the_text_observer_factory(monkeypatch):
    monkeypatch.setattr(logs, "_DIRECT_TEXT", None)
    observer = namedAny(TWISTD_TEXT_LOGGER)()
    assert isinstance(observer, ClassicTextObserver) and logs._DIRECT_TEXT is observer


def test_a_broken_standard_output_turns_direct_lines_back_into_events(monkeypatch, captured):
    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(logs, "_DIRECT_TEXT", ClassicTextObserver(Broken()))
    access = logger("access")
    log_info_line(access, "first", lambda: {"status": 200})
    log_info_line(access, "second", lambda: {"status": 201})
    assert [(formatEvent(e), e["status"]) for e in captured] == [("first", 200), ("second", 201)]
    assert logs._DIRECT_TEXT is None  # the publisher deals with a failing observer from now on
