"""Settings: one frozen value built from defaults, environment variables and options.

Priority rises from built-in defaults to environment variables to command-line
options. Every setting is parsed and checked once; a bad value raises
``ConfigError`` naming the variable or option and the value (secrets are never
echoed). An empty environment variable counts as unset.

The parts: ``settings`` (the ``Settings`` value and the ``SETTINGS`` table),
``parsers`` (one parser per kind of value), ``nodespec`` (``NODE_<n>`` and
``--node``) and ``reader`` (``settings_from``: the environment and options
read together).
"""

from __future__ import annotations

from blyanproxy.config.nodespec import NodeSpec, parse_node
from blyanproxy.config.parsers import MAX_MILLISECONDS
from blyanproxy.config.reader import settings_from
from blyanproxy.config.settings import (
    DEFAULT_LISTEN,
    LISTEN_OPTION,
    POLICIES,
    SETTINGS,
    SETTINGS_BY_FIELD,
    ConfigError,
    Setting,
    Settings,
)

__all__ = [
    "DEFAULT_LISTEN",
    "LISTEN_OPTION",
    "MAX_MILLISECONDS",
    "POLICIES",
    "SETTINGS",
    "SETTINGS_BY_FIELD",
    "ConfigError",
    "NodeSpec",
    "Setting",
    "Settings",
    "parse_node",
    "settings_from",
]
