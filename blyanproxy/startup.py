"""The start-up summary: what one proxy process actually runs, told once its port is open.

``StartupFacts`` is gathered by the composition root (``tap``) after the
fleet was restored, so it shows the nodes after the state merge and the
policy in force (a policy set at run time and kept in the state store wins
over ``SELECTION_POLICY``), not the declared settings. ``summary_lines`` turns
the facts and the bound address into log events; ``log_summary`` writes them,
one line per subject, in the ``blyanproxy.startup`` namespace.
"""

from __future__ import annotations

from importlib import metadata

import attrs

from blyanproxy.logs import logger

log = logger("startup")

#: Node names shown in the summary; a larger fleet is shown as the first ones and a count.
MAX_NAMES = 20

#: One log event: its format and its fields.
Line = tuple[str, dict[str, object]]


def package_version() -> str:
    """blyanproxy's installed version, or ``"(not installed)"`` when run from a source tree."""
    try:
        return metadata.version("blyanproxy")
    except metadata.PackageNotFoundError:
        return "(not installed)"


@attrs.frozen
class StartupFacts:
    """What one proxy process runs (see the module docstring).

    ``process`` says which process this is ("one process", "worker 2");
    ``store`` and ``token`` say where the fleet and the admin token come from
    ("state file ./data/proxy_state.json (loaded)", "ADMIN_TOKEN");
    ``runtime_policy`` is the policy set at run time that the store kept, if any.
    """

    listen: str
    process: str
    nodes: tuple[str, ...]
    declared: int
    store: str
    token: str
    policy: str
    settings_policy: str
    runtime_policy: str | None = None
    discovery: str | None = None
    version: str = attrs.field(factory=package_version)


def names_text(names: tuple[str, ...]) -> str:
    """The node names, comma-separated; past ``MAX_NAMES``, the first ones and how many more."""
    if not names:
        return "none"
    shown = ", ".join(names[:MAX_NAMES])
    more = len(names) - MAX_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def policy_source(facts: StartupFacts) -> str:
    """Why this policy is in force."""
    if facts.runtime_policy is None:
        return "SELECTION_POLICY"
    if facts.runtime_policy == facts.settings_policy:
        return "set at run time and kept in the state store; SELECTION_POLICY agrees"
    return f"set at run time and kept in the state store, over SELECTION_POLICY {facts.settings_policy}"


def summary_lines(facts: StartupFacts, address: str) -> list[Line]:
    """The summary's log events, for a process listening on ``address``."""
    lines: list[Line] = [
        ("blyan-proxy {version} listening on {address} ({listen}), {process}",
         {"version": facts.version, "address": address, "listen": facts.listen, "process": facts.process}),
        ("nodes: {count} after the state merge ({names}); {declared} declared in the settings",
         {"count": len(facts.nodes), "names": names_text(facts.nodes), "declared": facts.declared}),
    ]
    if facts.discovery is not None:
        lines.append(("nodes per API key: from the workloads API at {api_url}", {"api_url": facts.discovery}))
    lines += [
        ("state: {store}", {"store": facts.store}),
        ("admin token: {token}", {"token": facts.token}),
        ("policy: {policy} ({policy_source})", {"policy": facts.policy, "policy_source": policy_source(facts)}),
        # The engines detected on the nodes (one line per engine) belong here: a later issue.
    ]
    return lines


def log_summary(facts: StartupFacts, address: str) -> None:
    """Write the start-up summary (INFO, one event per line of ``summary_lines``)."""
    for text, fields in summary_lines(facts, address):
        log.info(text, **fields)
