"""The command line of ``twistd blyan-proxy``: its options, read into ``Settings``."""

from __future__ import annotations

import os

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from blyanproxy.config import LISTEN_OPTION, SETTINGS, ConfigError, Setting, Settings
from blyanproxy.logs import choose_process_log
from blyanproxy.serve import load_settings
from blyanproxy.upstream import load_trust_root


def _option_help(setting: Setting) -> str:
    env = f"env {setting.env}, " if setting.env else ""
    return f"{setting.meaning} [{env}default {setting.default}]"


class Options(usage.Options):
    """Options of ``twistd blyan-proxy``; each has an environment variable (see README)."""

    synopsis = "[options]"
    longdesc = (
        "Streaming reverse proxy and load balancer for GPU inference nodes. Settings come from "
        "built-in defaults, then environment variables, then these options. Nodes come from "
        "NODE_<n>=name|url[|weight=N|tags=a,b|tls_verify=false|engine=vllm|models=a,b|max_inflight=N] "
        "variables and --node."
    )
    optParameters = [[LISTEN_OPTION.option, "p", None, _option_help(LISTEN_OPTION)]] + [
        [setting.option, None, None, _option_help(setting)]
        for setting in SETTINGS
        if setting.option is not None
    ]

    def __init__(self) -> None:
        super().__init__()
        self.node_options: list = []
        self.settings: Settings = Settings()

    def opt_node(self, value: str) -> None:
        """Add a node: name|url[|weight=N|tags=a,b|engine=E|models=a,b|max_inflight=N|...] (repeatable)."""
        self.node_options.append(value)

    def worker_arguments(self) -> list:
        """The ``blyan-proxy`` arguments a worker process gets: these options but ``--workers``."""
        names = [str(name) for name, *_ in self.optParameters]
        given = [f"--{name}={self[name]}" for name in names if name != "workers" and self[name] is not None]
        return given + [f"--node={value}" for value in self.node_options]

    def postOptions(self) -> None:
        """Read the settings; a bad one ends start-up with one line naming it (no help text)."""
        try:
            self.settings = load_settings(os.environ, self, self.node_options)
        except ConfigError as exc:
            raise SystemExit(f"blyan-proxy: {exc}") from None
        try:
            serverFromString(None, self.settings.listen)  # parse only: twistd picks the reactor later
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"blyan-proxy: --port: {self.settings.listen!r} is not usable ({exc})") from None
        for variable, ca_file in (("TLS_CA_FILE", self.settings.tls_ca_file),
                                  ("ETCD_CA_FILE", self.settings.etcd_ca_file)):
            try:
                if ca_file:
                    load_trust_root(ca_file)
            except ValueError as exc:
                raise SystemExit(f"blyan-proxy: {variable}: {exc}") from None
        # Read now, before twistd starts its log: LOG_FORMAT=json makes that log JSON lines.
        choose_process_log(getattr(self, "parent", None), self.settings.log_format)
