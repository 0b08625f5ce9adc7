"""The rules a node's settings follow, each written once: its id, name, tags, weight, metadata,
engine, models, concurrency cap and base URL.

The settings (``NODE_<n>``, ``--node``) and the admin API check name, tags,
weight, metadata, engine, models and cap with these; the stored fleet (state file, its backup,
etcd, Blyan's file) checks every field with them, the id and the declaration
(``declaredBy``) too, so a stored record is never trusted more than admin
input; the registry, the fleet edits and the settings keep base URLs unique
with ``check_url_free`` and ``url_taken``. A
check that fails raises ``NodeFieldError``: ``field`` names the setting and
``problem`` says what is wrong, so each caller puts the words its users know in
front (``name: must be ...`` for the admin API, ``node 'gpu-a': weight must
be ...`` for a stored node). Pure, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from blyanproxy.core.engines import ENGINES

if TYPE_CHECKING:
    from blyanproxy.core.nodes import Node

NAME_MAX_LENGTH = 128
MIN_WEIGHT = 1
MAX_WEIGHT = 1000
MAX_METADATA_BYTES = 16 * 1024
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
#: ``metadata.healthPath``: a path on the node itself (never ``//host`` or ``@host``), printable ASCII.
_HEALTH_PATH = re.compile(r"/(?!/)[!-~]{0,1023}\Z")
#: ``declaredBy``: the setting that declared a node (``NODE_3``, ``--node``).
_DECLARATION = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")

NAME_PROBLEM = f"must be 1 to {NAME_MAX_LENGTH} printable characters, without '|'"
TAGS_PROBLEM = "must be a list of tags (letters, digits, '.', '_', ':', '-')"
WEIGHT_PROBLEM = f"must be a whole number from {MIN_WEIGHT} to {MAX_WEIGHT}"
ENGINE_PROBLEM = "must be one of " + ", ".join(ENGINES)
MAX_MODELS = 64
MODEL_MAX_LENGTH = 256
MODELS_PROBLEM = (f"must be a list of at most {MAX_MODELS} model names (1 to {MODEL_MAX_LENGTH} "
                  "printable characters, without ',' or '|')")
ID_PROBLEM = "must be 1 to 64 letters, digits, '.', '_', ':' or '-'"
DECLARATION_PROBLEM = "must name a setting such as NODE_3 or --node"


class NodeFieldError(ValueError):
    """A node setting that breaks its rule; the message reads ``"<field> <problem>"``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def node_name(value: object) -> str:
    """``value`` without surrounding spaces when it is a node name, else ``NodeFieldError``.

    A name is 1 to 128 printable characters without ``|`` (the separator of
    ``NODE_<n>``). Printable rules out control characters and Unicode line and
    paragraph separators, which would split log lines; the length and the
    characters are those of ``value`` as given, spaces around it included.
    """
    if (not isinstance(value, str) or not value.strip() or len(value) > NAME_MAX_LENGTH
            or not value.isprintable() or "|" in value):
        raise NodeFieldError("name", NAME_PROBLEM)
    return value.strip()


def is_tag(value: object) -> bool:
    """Whether ``value`` is a tag: 1 to 64 letters, digits, ``.``, ``_``, ``:`` or ``-``, the first alphanumeric."""
    return isinstance(value, str) and _TAG.match(value) is not None


def node_tags(values: object) -> tuple[str, ...]:
    """``values`` (a list or tuple of tags) as a tuple, or ``NodeFieldError`` when it is anything else."""
    if not isinstance(values, (list, tuple)):
        raise NodeFieldError("tags", TAGS_PROBLEM)
    tags: list[str] = []
    for tag in values:
        if not isinstance(tag, str) or not is_tag(tag):
            raise NodeFieldError("tags", TAGS_PROBLEM)
        tags.append(tag)
    return tuple(tags)


def node_weight(value: object) -> int:
    """``value`` when it is a node weight (a whole number from 1 to 1000, not a bool), else ``NodeFieldError``."""
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise NodeFieldError("weight", WEIGHT_PROBLEM)
    return value


MAX_INFLIGHT_LIMIT = 100000
MAX_INFLIGHT_PROBLEM = f"must be null or a whole number from 1 to {MAX_INFLIGHT_LIMIT}"


def node_max_inflight(value: object) -> int | None:
    """``value`` when it is a node's concurrency cap (None, or 1 to 100000, not a bool), else ``NodeFieldError``."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INFLIGHT_LIMIT:
        raise NodeFieldError("maxInflight", MAX_INFLIGHT_PROBLEM)
    return value


def node_engine(value: object) -> str:
    """``value`` when it names an engine kind (``core.engines.ENGINES``), else ``NodeFieldError``."""
    if not isinstance(value, str) or value not in ENGINES:
        raise NodeFieldError("engine", ENGINE_PROBLEM)
    return value


def is_model_name(value: object) -> bool:
    """Whether ``value`` is a model name: 1 to 256 printable characters, without ``,`` or ``|``.

    Names such as ``meta-llama/Llama-3.1-8B-Instruct`` or ``llama3:latest`` qualify;
    commas and bars are the separators of ``NODE_<n>``.
    """
    return (isinstance(value, str) and 0 < len(value) <= MODEL_MAX_LENGTH and value.isprintable()
            and value.strip() == value and "," not in value and "|" not in value)


def node_models(values: object) -> tuple[str, ...]:
    """``values`` (a list or tuple of model names) as a tuple without repeats, else ``NodeFieldError``."""
    if not isinstance(values, (list, tuple)) or len(values) > MAX_MODELS:
        raise NodeFieldError("models", MODELS_PROBLEM)
    models: list[str] = []
    for model in values:
        if not is_model_name(model):
            raise NodeFieldError("models", MODELS_PROBLEM)
        if model not in models:
            models.append(model)
    return tuple(models)


def node_id(value: object) -> str:
    """``value`` when it is a node id (1 to 64 letters, digits, ``.``, ``_``, ``:`` or ``-``), else ``NodeFieldError``.

    Ids the proxy makes are 16 hex digits; stored ones (Blyan's too) may be
    any such word. An id ends up in URLs, logs and etcd keys.
    """
    if not isinstance(value, str) or _ID.match(value) is None:
        raise NodeFieldError("id", ID_PROBLEM)
    return value


def node_metadata(value: object) -> dict[str, object]:
    """``value`` when it is a node's metadata, else ``NodeFieldError``.

    An object of at most 16 KiB as JSON; its ``healthPath``, when given, is a
    path on the node (``/ready``): printable ASCII, never ``//host``.
    """
    if not isinstance(value, dict):
        raise NodeFieldError("metadata", "must be an object")
    if len(json.dumps(value)) > MAX_METADATA_BYTES:
        raise NodeFieldError("metadata", f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    path = value.get("healthPath")
    if path is not None and not (isinstance(path, str) and _HEALTH_PATH.match(path)):
        raise NodeFieldError("metadata", "healthPath must be a path on the node such as /health (printable ASCII)")
    return value


def node_declaration(value: object) -> str | None:
    """``value`` (``None``, or the setting that declared a node: ``NODE_3``, ``--node``), else ``NodeFieldError``."""
    if value is None:
        return None
    if not isinstance(value, str) or _DECLARATION.match(value) is None:
        raise NodeFieldError("declaredBy", DECLARATION_PROBLEM)
    return value


def url_taken(base_url: str, owner: str) -> str:
    """What to say when ``base_url`` is already the base URL of ``owner`` (a node, or a setting)."""
    return f"base URL {base_url} is already used by {owner}"


def check_url_free(nodes: Iterable[Node], candidate: Node) -> None:
    """``ValueError`` when a node of ``nodes`` other than ``candidate`` (by id) has its base URL.

    Two nodes never share a base URL: they would be one node counted twice.
    URLs compare parsed (``http://h:80/`` is ``http://h``).
    """
    for other in nodes:
        if other.id != candidate.id and other.url == candidate.url:
            raise ValueError(url_taken(candidate.base_url, f"node {other.name}"))
