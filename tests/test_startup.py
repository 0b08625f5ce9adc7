"""The start-up summary: what runs, after the state merge, one line per subject."""

from twisted.logger import formatEvent, globalLogPublisher

from blyanproxy.startup import MAX_NAMES, StartupFacts, log_summary, names_text, summary_lines


def facts(**changes):
    fields = dict(listen="tcp:9000:interface=127.0.0.1", process="one process", nodes=("gpu-a", "gpu-b", "gpu-c"),
                  declared=2, store="state file ./data/proxy_state.json (loaded)",
                  token="file /srv/data/admin_token (read)", policy="round-robin", settings_policy="round-robin",
                  version="1.2.3")
    fields.update(changes)
    return StartupFacts(**fields)


def rendered(summary):
    return [text.format(**fields) for text, fields in summary]


def test_the_summary_tells_what_runs():
    assert rendered(summary_lines(facts(), "127.0.0.1:9000")) == [
        "blyan-proxy 1.2.3 listening on 127.0.0.1:9000 (tcp:9000:interface=127.0.0.1), one process",
        "nodes: 3 after the state merge (gpu-a, gpu-b, gpu-c); 2 declared in the settings",
        "state: state file ./data/proxy_state.json (loaded)",
        "admin token: file /srv/data/admin_token (read)",
        "policy: round-robin (SELECTION_POLICY)",
    ]


def test_a_policy_set_at_run_time_is_the_one_in_force_and_says_so():
    lines = rendered(summary_lines(facts(policy="least-latency", runtime_policy="least-latency"), "x"))
    assert lines[-1] == ("policy: least-latency (set at run time and kept in the state store, "
                         "over SELECTION_POLICY round-robin)")
    same = rendered(summary_lines(facts(runtime_policy="round-robin"), "x"))
    assert same[-1] == "policy: round-robin (set at run time and kept in the state store; SELECTION_POLICY agrees)"


def test_workload_discovery_and_an_empty_fleet_are_told():
    lines = rendered(summary_lines(facts(nodes=(), declared=0, discovery="https://api.example.com/api/v0"), "x"))
    assert lines[1] == "nodes: 0 after the state merge (none); 0 declared in the settings"
    assert lines[2] == "nodes per API key: from the workloads API at https://api.example.com/api/v0"


def test_a_large_fleet_shows_its_first_names_and_a_count():
    names = tuple(f"n{index}" for index in range(MAX_NAMES + 5))
    assert names_text(names) == ", ".join(names[:MAX_NAMES]) + " and 5 more"


def test_each_line_is_an_info_event_with_its_fields():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        log_summary(facts(), "127.0.0.1:9000")
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [event for event in events if event.get("log_namespace") == "blyanproxy.startup"]
    assert [formatEvent(event) for event in mine] == rendered(summary_lines(facts(), "127.0.0.1:9000"))
    assert {event["log_level"].name for event in mine} == {"info"}
    assert (mine[0]["address"], mine[1]["count"], mine[-1]["policy"]) == ("127.0.0.1:9000", 3, "round-robin")
