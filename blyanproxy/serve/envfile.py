"""``ENV_FILE``: a file of ``NAME=value`` settings the proxy reads itself, at start and on SIGHUP.

The syntax is the part of systemd's ``EnvironmentFile=`` that Docker's
``--env-file`` also reads the same way: one ``NAME=value`` per line, blank
lines and lines starting with ``#`` or ``;`` ignored, the value taken as it
is after the ``=`` (surrounding whitespace removed; one pair of enclosing
single or double quotes removed too). Values in the file override the process
environment; command-line options override both. Error messages name the
file and line, never the line's text (it may hold a token).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from blyanproxy.config import ConfigError, Settings, settings_from

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: The variable that names the file; inside the file it means nothing.
FILE_VARIABLE = "ENV_FILE"
FILE_OPTION = "env-file"


def parse_env_file(text: str, source: str = "the environment file") -> dict[str, str]:
    """The variables of an environment file; ``ConfigError`` naming the first bad line."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        name, sep, value = stripped.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise ConfigError(f"{source} line {number}: expected NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def read_env_file(path: str) -> dict[str, str]:
    """``parse_env_file`` of the file at ``path``; ``ConfigError`` when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as source:
            text = source.read()
    except OSError as exc:
        raise ConfigError(f"{FILE_VARIABLE}: {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{FILE_VARIABLE}: {path} is not UTF-8 text") from None
    values = parse_env_file(text, path)
    values.pop(FILE_VARIABLE, None)
    return values


def env_file_path(environ: Mapping[str, str], options: Mapping[str, object]):
    """The file named by ``--env-file`` or ``ENV_FILE``, or ``None``."""
    return options.get(FILE_OPTION) or environ.get(FILE_VARIABLE) or None


def load_settings(
    environ: Mapping[str, str], options: Mapping[str, object], option_nodes: Sequence[str] = ()
) -> Settings:
    """The ``Settings`` from the environment overlaid with ``ENV_FILE`` (if any), then the options."""
    path = env_file_path(environ, options)
    merged = dict(environ)
    if path:
        merged.update(read_env_file(path))
        merged[FILE_VARIABLE] = path
    return settings_from(merged, options, option_nodes)
