"""Building the ``Settings`` from the environment and the command-line options.

Priority rises from built-in defaults to environment variables to command-line
options; an empty environment variable counts as unset. A bad value raises
``ConfigError`` naming the variable or option and the value (secrets are never
echoed, nor a URL's credentials). Some settings are read together: ``LISTEN``/``PROXY_PORT``,
``MAX_ATTEMPTS``/``MAX_RETRIES``, the ``NODE_<n>`` variables, and ``WORKERS``
with what several workers need.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, TypeVar

from blyanproxy.config.nodespec import NodeSpec, parse_node
from blyanproxy.config.parsers import mask_credentials, whole_number
from blyanproxy.config.settings import (
    DEFAULT_LISTEN,
    LISTEN_OPTION,
    SETTINGS,
    SETTINGS_BY_FIELD,
    ConfigError,
    Setting,
    Settings,
)
from blyanproxy.core import url_taken

_NODE_VARIABLE = re.compile(r"NODE_(\d+)\Z")
_Value = TypeVar("_Value")


def _read(setting: Setting, env: Mapping[str, str], options: Mapping[str, object]) -> tuple[str, str] | None:
    """Return (source name, raw text) for a setting, or None when it is unset."""
    if setting.option is not None and options.get(setting.option) is not None:
        return "--" + setting.option, str(options[setting.option])
    if setting.env is not None and env.get(setting.env, "") != "":
        return setting.env, env[setting.env]
    return None


def _parse(parse: Callable[[str], _Value], source: str, raw: str, secret: bool = False) -> _Value:
    try:
        return parse(raw)
    except ValueError as exc:
        shown = "" if secret else f" (got {mask_credentials(raw)!r})"
        raise ConfigError(f"{source}: {exc}{shown}") from None


def _listen_value(env: Mapping[str, str], options: Mapping[str, object]) -> str:
    found = _read(LISTEN_OPTION, env, options)
    if found is not None:
        if found[0] == "LISTEN" and env.get("PROXY_PORT"):
            raise ConfigError("LISTEN and PROXY_PORT are both set: set one")
        return str(_parse(LISTEN_OPTION.parse, *found))
    if env.get("PROXY_PORT"):
        port = _parse(whole_number(0, 65535), "PROXY_PORT", env["PROXY_PORT"])
        return f"tcp:{port}:interface=127.0.0.1"
    return DEFAULT_LISTEN


def _max_attempts(env: Mapping[str, str], options: Mapping[str, object], values: dict[str, Any]) -> None:
    if env.get("MAX_RETRIES"):
        if _read(SETTINGS_BY_FIELD["max_attempts"], env, options) is not None:
            raise ConfigError("MAX_RETRIES and MAX_ATTEMPTS/--max-attempts are both set: set one")
        retries = _parse(whole_number(0, 19), "MAX_RETRIES", env["MAX_RETRIES"])
        values["max_attempts"] = retries + 1


def _nodes(env: Mapping[str, str], option_nodes: Sequence[str]) -> tuple[NodeSpec, ...]:
    found = []
    for name, value in env.items():
        match = _NODE_VARIABLE.match(name)
        if match and value != "":
            found.append((int(match.group(1)), name, value))
    sources = [(name, value) for _, name, value in sorted(found)]
    sources += [("--node", value) for value in option_nodes]
    specs = []
    for source, value in sources:
        try:
            specs.append(parse_node(value, source))
        except ValueError as exc:  # it names the field and its value, credentials masked
            raise ConfigError(f"{source}: {exc}") from None
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.base_url in seen:
            raise ConfigError(f"{spec.source}: {url_taken(spec.base_url, seen[spec.base_url])}")
        seen[spec.base_url] = spec.source
    return tuple(specs)


def settings_from(
    env: Mapping[str, str],
    options: Mapping[str, object],
    option_nodes: Sequence[str] = (),
) -> Settings:
    """Build the ``Settings`` from the environment and parsed options (``None`` = not given)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        found = _read(setting, env, options)
        if found is not None:
            source, raw = found
            sources[setting.field] = source
            values[setting.field] = _parse(setting.parse, source, raw, secret=setting.secret)
    _max_attempts(env, options, values)
    values["listen"] = _listen_value(env, options)
    values["nodes"] = _nodes(env, option_nodes)
    return _check_etcd(_check_workers(Settings(**values), sources.get("workers", "WORKERS")), sources)


def _check_etcd(settings: Settings, sources: Mapping[str, str]) -> Settings:
    """The etcd login comes as a pair, and the etcd settings need an etcd ``STATE_STORE``.

    ``sources`` says where each setting came from, so the error names what the operator typed.
    """

    def named(field: str) -> str:
        return sources.get(field) or str(SETTINGS_BY_FIELD[field].env)

    if (settings.etcd_user is None) != (settings.etcd_password_file is None):
        raise ConfigError(f"{named('etcd_user')} and {named('etcd_password_file')} go together: set both or neither")
    for field in ("etcd_user", "etcd_ca_file"):
        if getattr(settings, field) is not None and settings.state_store is None:
            raise ConfigError(f"{named(field)}: needs STATE_STORE=etcd://... or etcd+https://...")
    if settings.etcd_ca_file is not None and settings.state_store is not None and \
            not settings.state_store.base_url.startswith("https:"):
        raise ConfigError(f"{named('etcd_ca_file')}: needs STATE_STORE=etcd+https://host:port/prefix")
    return settings


def _check_workers(settings: Settings, source: str) -> Settings:
    """Several workers need a shared store and a listening socket they can all accept on.

    ``source`` is where the worker count came from (``WORKERS`` or ``--workers``),
    so the error names what the operator typed.
    """
    if settings.workers == 1:
        return settings
    if settings.demo:
        raise ConfigError(f"{source}: --demo runs in one process; use 1 worker")
    if settings.state_store is None:
        raise ConfigError(
            f"{source}: {settings.workers} workers need STATE_STORE=etcd://host:port/prefix: "
            "the state file is written by one process only"
        )
    if not settings.listen.startswith(("tcp:", "tcp6:", "unix:")):
        raise ConfigError(f"{source}: the listening endpoint must be tcp:, tcp6: or unix: (terminate TLS in front)")
    return settings
