"""The ``blyan-proxy`` and ``blyan-devnode`` commands, and the twistd plugins behind them.

``BlyanProxy`` and ``BlyanDevNode`` are the ``IServiceMaker`` plugins that
``twisted/plugins/blyan_proxy.py`` shows to ``twistd`` (``twistd -n
blyan-proxy``). The console scripts (``setup.cfg``'s entry points) run the
same plugin as ``twistd --nodaemon --pidfile= <plugin> ARGS`` would, but hand
the plugin to twistd directly instead of having twistd search
``twisted/plugins``: that search finds nothing after ``pip install -e .`` in
setuptools' default editable mode, and needs no plugin cache here. A bad
option or setting is one line on standard error and exit status 1, without
the help text (``--help`` prints it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from twisted.application.service import ServiceMaker
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions, runApp

BlyanProxy = ServiceMaker(
    "blyan-proxy",
    "blyanproxy.tap",
    "Streaming reverse proxy and load balancer for GPU inference nodes",
    "blyan-proxy",
)

BlyanDevNode = ServiceMaker(
    "blyan-devnode",
    "blyanproxy.devnode.tap",
    "A simulated GPU inference node (OpenAI and Ollama style) for demos and tests",
    "blyan-devnode",
)

#: The twistd options every console script runs with: in the foreground, no pid file.
TWISTD_ARGUMENTS = ("--nodaemon", "--pidfile=")


def twistd_options(maker: ServiceMaker) -> ServerOptions:
    """twistd's own options, knowing ``maker`` as their only plugin (no search of ``twisted/plugins``)."""

    class OnePluginOptions(ServerOptions):
        def getSynopsis(self) -> str:
            # The plugin's usage line reads "Usage: <tapname> [options]", the command typed.
            return "Usage:"

        @property
        def subCommands(self) -> Iterator[tuple]:
            # twistd's ApplicationRunner reads the plugin back from loadedPlugins.
            self.loadedPlugins = {maker.tapname: maker}
            yield (maker.tapname, None, lambda: maker.options(), maker.description)

    return OnePluginOptions()


def run_plugin(maker: ServiceMaker, arguments: Sequence[str]) -> NoReturn:
    """Run ``maker``'s service as ``twistd --nodaemon --pidfile= <tapname> arguments`` does; never returns."""
    config = twistd_options(maker)
    try:
        config.parseOptions([*TWISTD_ARGUMENTS, maker.tapname, *arguments])
    except usage.UsageError as problem:
        sys.exit(f"{maker.tapname}: {problem} (see {maker.tapname} --help)")
    runApp(config)
    sys.exit(0)


def proxy() -> NoReturn:
    """The ``blyan-proxy`` command: ``twistd -n blyan-proxy`` with the command's arguments."""
    run_plugin(BlyanProxy, sys.argv[1:])


def devnode() -> NoReturn:
    """The ``blyan-devnode`` command: ``twistd -n blyan-devnode`` with the command's arguments."""
    run_plugin(BlyanDevNode, sys.argv[1:])
