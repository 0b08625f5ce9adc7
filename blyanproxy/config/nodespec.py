"""Nodes declared in the settings: ``NODE_<n>=name|url[|key=value...]`` and ``--node``."""

from __future__ import annotations

import re
from typing import Any

import attrs

from blyanproxy.config.parsers import mask_credentials
from blyanproxy.core import (
    NodeFieldError,
    node_engine,
    node_max_inflight,
    node_models,
    node_name,
    node_tags,
    node_weight,
    parse_base_url,
    parse_boolean,
)

#: The form of a declaration, as error messages show it.
FORM = "name|url[|weight=N|tags=a,b|tls_verify=false|engine=E|models=a,b|max_inflight=N]"


@attrs.frozen
class NodeSpec:
    """A node named in the environment (``NODE_<n>``) or with ``--node``."""

    name: str
    base_url: str
    source: str
    tags: tuple[str, ...] = ()
    weight: int = 1
    tls_verify: bool = True
    engine: str = "auto"
    models: tuple[str, ...] = ()
    max_inflight: int | None = None


class NodeSpecError(ValueError):
    """A declaration that cannot be used; the message names the field and shows its value (credentials masked)."""

    def __init__(self, field: str, problem: str, value: str) -> None:
        super().__init__(f"{field}: {problem} (got {mask_credentials(value)!r})")
        self.field = field


def parse_node(text: str, source: str) -> NodeSpec:
    """Parse ``name|url[|key=value...]`` (keys: ``weight``, ``tags``, ``tls_verify``, ``engine``, ``models``,
    ``max_inflight``).

    ``NodeSpecError`` (a ``ValueError``) names the field that is wrong and shows
    its value, never a URL's credentials.
    """
    fields = text.split("|")
    if len(fields) < 2:
        raise ValueError(f"expected name|url, the form {FORM} (got {mask_credentials(text)!r})")
    try:
        name = node_name(fields[0].strip())
    except NodeFieldError as exc:
        raise NodeSpecError("name", exc.problem, fields[0]) from None
    url = fields[1].strip()
    try:
        base = parse_base_url(url)
    except ValueError as exc:
        raise NodeSpecError("url", str(exc), url) from None
    extras: dict[str, Any] = {}
    for item in fields[2:]:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"expected key=value after the URL, the form {FORM} (got {mask_credentials(item)!r})")
        try:
            if key == "weight":
                extras["weight"] = node_weight(int(value) if re.fullmatch(r"\d+", value.strip()) else value)
            elif key == "tags":
                extras["tags"] = node_tags(tuple(t.strip() for t in value.split(",") if t.strip()))
            elif key == "tls_verify":
                extras["tls_verify"] = parse_boolean(value)
            elif key == "engine":
                extras["engine"] = node_engine(value.strip())
            elif key == "models":
                extras["models"] = node_models(tuple(m.strip() for m in value.split(",") if m.strip()))
            elif key == "max_inflight":
                extras["max_inflight"] = node_max_inflight(
                    int(value) if re.fullmatch(r"\d+", value.strip()) else value)
            else:
                raise ValueError(f"unknown key {key!r} (known: weight, tags, tls_verify, engine, models, max_inflight)")
        except NodeFieldError as exc:
            raise NodeSpecError(key, exc.problem, value) from None
        except ValueError as exc:
            if key not in ("weight", "tags", "tls_verify", "engine", "models", "max_inflight"):
                raise
            raise NodeSpecError(key, str(exc), value) from None
    return NodeSpec(name=name, base_url=base.text, source=source, **extras)
