"""The soak's report: the proxy's figures at each phase and how every exchange, fault and admin call ended."""

from __future__ import annotations

import os
from collections import Counter

import attrs


@attrs.define
class Figures:
    """The proxy at one moment: open descriptors, resident MiB, requests in flight on its nodes."""

    at: float
    fds: int
    rss_mib: float
    in_flight: int


@attrs.define
class Report:
    """What a soak saw; ``text()`` is the report."""

    duration: float
    start: Figures | None = None
    phases: list[Figures] = attrs.Factory(list)
    end: Figures | None = None
    outcomes: Counter = attrs.Factory(Counter)  # (kind, outcome) -> count
    error_codes: Counter = attrs.Factory(Counter)  # the proxy's error code -> count
    faults: Counter = attrs.Factory(Counter)
    admin: Counter = attrs.Factory(Counter)  # "METHOD route status" -> count
    fleet_problems: list[str] = attrs.Factory(list)
    proxy_exit: tuple | None = None
    proxy_tracebacks: int = 0

    def count(self, outcome: str) -> int:
        """Exchanges of every kind that ended so."""
        return sum(n for (_, how), n in self.outcomes.items() if how == outcome)

    def text(self) -> str:
        """The report as lines of text."""
        lines = [f"soak with faults, {self.duration:g} s"]
        for name, figures in [("start", self.start)] + [(f"phase {i + 1}", f) for i, f in enumerate(self.phases)] \
                + [("drained", self.end)]:
            if figures is not None:
                lines.append(f"  {name:>9} t={figures.at:6.1f}s fds={figures.fds:4d} rss={figures.rss_mib:6.1f} MiB "
                             f"in-flight={figures.in_flight}")
        kinds = sorted({kind for kind, _ in self.outcomes})
        for kind in kinds:
            counts = {how: n for (k, how), n in self.outcomes.items() if k == kind}
            lines.append(f"  {kind:>12}: " + ", ".join(f"{how} {n}" for how, n in sorted(counts.items())))
        lines.append("  errors by code: " + ", ".join(f"{code} {n}" for code, n in self.error_codes.most_common()))
        lines.append("  faults: " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items())))
        lines.append("  admin answers: " + ", ".join(f"{call} {n}" for call, n in sorted(self.admin.items())))
        lines.append(f"  false successes: {self.count('false_success')}; "
                     f"timeouts (frozen node, item 3): {self.count('timeout')}")
        lines.append("  fleet in etcd: " + ("intact" if not self.fleet_problems else "; ".join(self.fleet_problems)))
        lines.append(f"  proxy exit: {self.proxy_exit}; tracebacks in its log: {self.proxy_tracebacks}")
        return "\n".join(lines)


def proxy_figures(pid: int, in_flight: int, at: float) -> Figures:
    """Descriptors and resident memory of process ``pid`` (from /proc)."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024.0
    return Figures(at, len(os.listdir(f"/proc/{pid}/fd")), rss, in_flight)
