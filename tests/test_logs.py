"""LOG_LEVEL decides which of blyanproxy's events reach twistd's log."""

import pytest
from twisted.logger import globalLogPublisher

from blyanproxy.logs import logger, set_log_level


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


def test_json_format_writes_one_object_per_line():
    import io
    import json

    from blyanproxy.logs import set_log_format

    stream = io.StringIO()
    set_log_format("json", stream)
    try:
        logger("test").info("node {node} is {state}", node="gpu-a", state="up")
    finally:
        set_log_format("text")
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["log_namespace"] == "blyanproxy.test"
    assert (event["node"], event["state"], event["log_level"]["name"]) == ("gpu-a", "up", "info")
