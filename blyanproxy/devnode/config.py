"""Settings of a simulated GPU node: the config value type and how it is read from text.

Text comes from three places that share one parser per field: ``twistd blyan-devnode`` options,
``X-Devnode-<Knob>`` request headers and ``devnode_<knob>`` query parameters. Pure, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import attrs

from blyanproxy.core import boolean_word
from blyanproxy.devnode.engines import ENGINES, is_engine

MAX_TOKENS_CAP = 100_000
"""The longest completion a node generates, whatever a request asks for."""


def _number(minimum: float, *, above: bool) -> Callable[[object, attrs.Attribute, object], None]:
    """Validator: a finite int or float, above ``minimum`` (``above``) or at least ``minimum``."""
    relation = ">" if above else ">="

    def check(instance: object, attribute: attrs.Attribute, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{attribute.name} must be a number, not {value!r}")
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise ValueError(f"{attribute.name} must be a finite number {relation} {minimum}, not {value!r}")

    return check


def _integer(minimum: int, maximum: int | None = None) -> Callable[[object, attrs.Attribute, object], None]:
    """Validator: an int (not a bool) from ``minimum`` to ``maximum`` (no upper bound if None)."""
    bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"

    def check(instance: object, attribute: attrs.Attribute, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name} must be an integer, not {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"{attribute.name} must be an integer {bounds}, not {value!r}")

    return check


def _text(instance: object, attribute: attrs.Attribute, value: object) -> None:
    """Validator: a string that is not blank."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{attribute.name} must be a non-empty string, not {value!r}")


def _engine(instance: object, attribute: attrs.Attribute, value: object) -> None:
    """Validator: an engine a devnode can speak like."""
    if not is_engine(value):
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {value!r}")


def _model_names(instance: object, attribute: attrs.Attribute, value: tuple[object, ...]) -> None:
    """Validator: at least one model, each a non-empty string without commas."""
    if not value:
        raise ValueError("models must name at least one model")
    for name in value:
        if not isinstance(name, str) or not name.strip() or "," in name:
            raise ValueError(f"models: bad model name {name!r}")


def _as_tuple(value: str | Iterable[str]) -> tuple[str, ...]:
    """Converter: a single string is one model; any other iterable becomes a tuple."""
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class DevNodeConfig:
    """How one simulated node behaves. Replaced whole, never mutated, when changed at runtime.

    Times are milliseconds and rates tokens per second. ``fail_status``, ``close_after`` and
    ``hang`` inject failures into inference requests; ``/health`` has its own two knobs and the
    diagnostic ``/_devnode/`` endpoints are never failed, so a node can always be reconfigured.
    ``engine`` is the engine whose paths and answers the node imitates (``devnode.engines``);
    for ``loading_ms`` after it starts, the node answers as that engine does while loading.
    Like a GPU (``devnode.gpu``) it runs at most ``max_num_seqs`` generations at once (the rest
    wait), and its time to first token is ``ttft_ms`` plus ``prompt_token_ms`` per prompt token
    not in its prefix cache of ``prefix_cache_blocks`` blocks.
    """

    name: str = attrs.field(default="devnode", validator=_text)
    models: tuple[str, ...] = attrs.field(
        default=("blyan-sim-7b",), converter=_as_tuple, validator=_model_names
    )
    tokens_per_second: float = attrs.field(default=50.0, validator=_number(0, above=True))
    ttft_ms: float = attrs.field(default=50.0, validator=_number(0, above=False))
    max_tokens: int = attrs.field(default=16, validator=_integer(1, MAX_TOKENS_CAP))
    fail_status: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_integer(400, 599))
    )
    close_after: int | None = attrs.field(default=None, validator=attrs.validators.optional(_integer(0)))
    hang: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    health_status: int = attrs.field(default=200, validator=_integer(200, 599))
    health_delay_ms: float = attrs.field(default=0.0, validator=_number(0, above=False))
    engine: str = attrs.field(default="blyan", validator=_engine)
    loading_ms: float = attrs.field(default=0.0, validator=_number(0, above=False))
    max_num_seqs: int = attrs.field(default=256, validator=_integer(1))
    prompt_token_ms: float = attrs.field(default=0.0, validator=_number(0, above=False))
    prefix_cache_blocks: int = attrs.field(default=1024, validator=_integer(0))


@attrs.frozen
class SettingError(Exception):
    """A setting that cannot be applied: its name as the user spelled it, the value given, and why."""

    name: str
    value: object
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: bad value {self.value!r}: {self.reason}"


_NONE = frozenset({"", "none", "null", "off"})


def parse_flag(text: str) -> bool:
    """Read a yes/no text (``1``/``0``, ``true``/``false``, ``yes``/``no``, ``on``/``off``; empty is no)."""
    meaning = boolean_word(text) if text.strip() else False
    if meaning is None:
        raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
    return meaning


def _optional_int(text: str) -> int | None:
    """Read an integer, or None for ``none``/``null``/``off``/empty (which switches a failure knob off)."""
    return None if text.strip().lower() in _NONE else int(text)


def _model_list(text: str) -> tuple[str, ...]:
    """Read comma-separated model names."""
    return tuple(part.strip() for part in text.split(","))


# Each parser returns its field's type (Any: they differ); the field's validator checks the value.
_TEXT_PARSERS: Mapping[str, Callable[[str], Any]] = {
    "name": str.strip,
    "models": _model_list,
    "tokens_per_second": float,
    "ttft_ms": float,
    "max_tokens": int,
    "fail_status": _optional_int,
    "close_after": _optional_int,
    "hang": parse_flag,
    "health_status": int,
    "health_delay_ms": float,
    "engine": str.strip,
    "loading_ms": float,
    "max_num_seqs": int,
    "prompt_token_ms": float,
    "prefix_cache_blocks": int,
}

KNOBS: Mapping[str, str] = {
    "tps": "tokens_per_second",
    "ttft_ms": "ttft_ms",
    "tokens": "max_tokens",
    "fail_status": "fail_status",
    "close_after": "close_after",
    "hang": "hang",
}
"""Per-request knob name -> the DevNodeConfig field it overrides for that request."""

_HEADER_PREFIX = b"x-devnode-"
_QUERY_PREFIX = b"devnode_"
_NOT_KNOBS = frozenset({"set_header"})  # X-Devnode-Set-Header is an instruction to /_devnode/echo

Setting = tuple[str, str, str]
"""(name as the user spelled it, DevNodeConfig field, text value)."""


def evolve_from_text(config: DevNodeConfig, settings: Iterable[Setting]) -> DevNodeConfig:
    """Return ``config`` with every setting applied in order; a bad one raises SettingError naming it."""
    for name, field, text in settings:
        try:
            config = attrs.evolve(config, **{field: _TEXT_PARSERS[field](text)})
        except (TypeError, ValueError) as error:
            raise SettingError(name, text, str(error)) from None
    return config


def request_knobs(
    headers: Iterable[tuple[bytes, bytes]], query: Mapping[bytes, Sequence[bytes]]
) -> list[Setting]:
    """The knobs a request carries, headers first and then query parameters, so the query wins.

    Header names are case-insensitive with ``-`` for ``_`` (``X-Devnode-Ttft-Ms``); query names are
    exact (``devnode_ttft_ms``). An unknown knob raises SettingError rather than being ignored.
    """
    found: list[Setting] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered.startswith(_HEADER_PREFIX):
            found.extend(_knob(lowered[len(_HEADER_PREFIX) :].replace(b"-", b"_"), value))
    for key, values in query.items():
        if key.startswith(_QUERY_PREFIX):
            for value in values:
                found.extend(_knob(key[len(_QUERY_PREFIX) :], value))
    return found


def _knob(raw_name: bytes, raw_value: bytes) -> list[Setting]:
    """The setting one knob stands for: none for names that are not knobs, SettingError if unknown."""
    name = raw_name.decode("latin-1")
    value = raw_value.decode("latin-1")
    if name in _NOT_KNOBS:
        return []
    if name not in KNOBS:
        raise SettingError(name, value, f"unknown devnode knob (known: {', '.join(KNOBS)})")
    return [(name, KNOBS[name], value)]


def apply_knobs(
    config: DevNodeConfig, headers: Iterable[tuple[bytes, bytes]], query: Mapping[bytes, Sequence[bytes]]
) -> DevNodeConfig:
    """The config one request runs with: the node's, overridden by the request's knobs."""
    return evolve_from_text(config, request_knobs(headers, query))
