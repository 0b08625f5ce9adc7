"""Pure checks of admin input: a new node, changes to a node, a policy, an index."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from blyanproxy.core import (
    POLICIES,
    NodeFieldError,
    ProxyError,
    node_engine,
    node_max_inflight,
    node_metadata,
    node_models,
    node_name,
    node_tags,
    node_weight,
    parse_base_url,
)

_CREATE_FIELDS = {"name", "baseURL", "tags", "metadata", "weight", "tlsVerify", "engine", "models", "maxInflight"}
_PATCH_FIELDS = {"name", "tags", "metadata", "weight", "draining", "engine", "models", "maxInflight"}


def invalid(field: str, problem: str) -> ProxyError:
    """A 400 naming the field and the problem."""
    return ProxyError(400, "invalid_field", f"{field}: {problem}")


def parse_json_body(body: bytes) -> Any:
    """The JSON document of a request body, or a 400."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProxyError(400, "malformed_json", f"the body is not valid JSON ({exc})") from None


def _object(document: Any, allowed: set) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise ProxyError(400, "invalid_body", "the body must be a JSON object")
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise invalid(unknown[0], f"unknown field (known: {', '.join(sorted(allowed))})")
    return document


def _node_field(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A ``noderules`` check whose refusal is a 400 naming the field."""

    def checked(value: Any) -> Any:
        try:
            return check(value)
        except NodeFieldError as broken:
            raise invalid(broken.field, broken.problem) from None

    return checked


_name = _node_field(node_name)


def _boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(field, "must be true or false")
    return value


#: JSON field -> (Node field, check) for the fields a request may leave out.
_OPTIONAL = {
    "name": ("name", _name),
    "tags": ("tags", _node_field(node_tags)),
    "metadata": ("metadata", _node_field(node_metadata)),
    "weight": ("weight", _node_field(node_weight)),
    "tlsVerify": ("tls_verify", lambda value: _boolean("tlsVerify", value)),
    "draining": ("draining", lambda value: _boolean("draining", value)),
    "engine": ("engine", _node_field(node_engine)),
    "models": ("models", _node_field(node_models)),
    "maxInflight": ("max_inflight", _node_field(node_max_inflight)),
}


def _optional(data: dict[str, Any], names) -> dict[str, Any]:
    """The checked ``Node`` fields for those of ``names`` present in ``data``."""
    fields: dict[str, Any] = {}
    for name in names:
        if name in data:
            field, check = _OPTIONAL[name]
            fields[field] = check(data[name])
    return fields


def new_node_fields(document: Any) -> dict[str, Any]:
    """The ``Node`` fields of ``{name, baseURL, tags?, metadata?, weight?, tlsVerify?, engine?, models?}``."""
    data = _object(document, _CREATE_FIELDS)
    for required in ("name", "baseURL"):
        if required not in data:
            raise invalid(required, "missing")
    if not isinstance(data["baseURL"], str):
        raise invalid("baseURL", "must be a string")
    try:
        base_url = parse_base_url(data["baseURL"]).text
    except ValueError as exc:
        raise invalid("baseURL", str(exc)) from None
    fields: dict[str, Any] = {"name": _name(data["name"]), "base_url": base_url}
    fields.update(_optional(data, ("tags", "metadata", "weight", "tlsVerify", "engine", "models",
                                 "maxInflight")))
    return fields


def node_changes(document: Any) -> dict[str, Any]:
    """The ``Node`` fields a PATCH changes (``name``, ``tags``, ``metadata``, ``weight``, ``draining``,
    ``engine``, ``models``)."""
    return _optional(_object(document, _PATCH_FIELDS), ("name", "tags", "metadata", "weight", "draining",
                                                        "engine", "models", "maxInflight"))


def policy_name(document: Any) -> str:
    """The policy of ``{"policy": name}``."""
    data = _object(document, {"policy"})
    if not isinstance(data.get("policy"), str) or data["policy"] not in POLICIES:
        raise invalid("policy", "must be one of " + ", ".join(POLICIES))
    return data["policy"]


def strict_index(text: str) -> int:
    """A list index written as plain decimal digits (``01``, ``1.0``, ``-1``, ``1e2`` refused)."""
    if not re.fullmatch(r"0|[1-9][0-9]{0,8}", text):
        raise invalid("index", "must be a whole number written in digits")
    return int(text)
