"""What a workloads API says about one API key, as pure values: ``Workload`` and its nodes.

The API answers ``POST {API_URL}/workloads`` with a JSON array of objects
(``created``, ``expires``, ``node``, ``running``, ``status``, ``type``,
``workload``, ``tags``). ``parse_workloads`` turns that into ``Workload``
values, refusing anything that is not such an array; ``workload_nodes`` makes
the routable ``Node`` of each usable one, in the API's order, leaving out the
nodes ``NodeAllowList`` does not allow (``WORKLOADS_NODE_ALLOW``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import attrs

from blyanproxy.core import Node
from blyanproxy.discovery.nodeallow import NodeAllowList
from blyanproxy.logs import logger

log = logger("workloads")

#: A node as the API names it: a host name or address, optionally with a port.
_NODE_NAME = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_TAG_LIMIT = 64
_TEXT_LIMIT = 256


class WorkloadsFormatError(ValueError):
    """The workloads API's answer is not the JSON array of workloads it should be."""


def _text(value, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WorkloadsFormatError(f"{field} is not text")
    return value[:_TEXT_LIMIT]


def _seconds(value, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WorkloadsFormatError(f"{field} is not a number")
    return int(value)


@attrs.frozen
class Workload:
    """One workload of an API key, as the API described it (unknown fields dropped)."""

    workload: str
    node: str
    running: bool
    status: str
    type: str = ""
    created: int | None = None
    expires: int | None = None
    tags: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """Running, by both of the API's signals (``running`` and ``status == "running"``)."""
        return self.running and self.status == "running"

    def as_json(self) -> dict:
        """The workload in the API's own shape."""
        return {
            "created": self.created,
            "expires": self.expires,
            "node": self.node,
            "running": self.running,
            "status": self.status,
            "type": self.type,
            "workload": self.workload,
            "tags": list(self.tags),
        }


def _workload(item) -> Workload:
    if not isinstance(item, dict):
        raise WorkloadsFormatError("an entry is not an object")
    running = item.get("running", False)
    if not isinstance(running, bool):
        raise WorkloadsFormatError("running is not true or false")
    tags = item.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise WorkloadsFormatError("tags is not a list of text")
    return Workload(
        workload=_text(item.get("workload"), "workload"),
        node=_text(item.get("node"), "node"),
        running=running,
        status=_text(item.get("status"), "status"),
        type=_text(item.get("type"), "type"),
        created=_seconds(item.get("created"), "created"),
        expires=_seconds(item.get("expires"), "expires"),
        tags=tuple(tag[:_TEXT_LIMIT] for tag in tags[:_TAG_LIMIT]),
    )


def parse_workloads(body: bytes) -> tuple[Workload, ...]:
    """The workloads in an API answer; ``WorkloadsFormatError`` when it is not a JSON array of them."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WorkloadsFormatError("the answer is not JSON") from None
    if not isinstance(document, list):
        raise WorkloadsFormatError("the answer is not a JSON array")
    return tuple(_workload(item) for item in document)


@attrs.frozen
class NodeAddressing:
    """How a workload's ``node`` becomes a URL: ``{scheme}://{node}[:{port}]``, and whether it may.

    ``port`` 0 keeps the node's own port, or the scheme's default; ``allow``
    decides which nodes are used at all.
    """

    scheme: str = "https"
    port: int = 0
    allow: NodeAllowList = NodeAllowList()

    def base_url(self, node_name: str) -> str:
        """The base URL of the node the API calls ``node_name``."""
        has_port = node_name.rsplit("]", 1)[-1].count(":") == 1
        suffix = f":{self.port}" if self.port and not has_port else ""
        return f"{self.scheme}://{node_name}{suffix}"


def _node_of(item: Workload, addressing: NodeAddressing) -> Node | None:
    if not _NODE_NAME.match(item.node):
        return None
    base_url = addressing.base_url(item.node)
    try:
        # The id is the URL: two workloads on one node are one node to fail over from.
        return Node(id=base_url, name=item.node, base_url=base_url, tags=item.tags)
    except ValueError:
        return None


def workload_nodes(workloads: Sequence[Workload], addressing: NodeAddressing) -> tuple[Node, ...]:
    """The routable ``Node`` of every usable workload, in the API's order.

    A workload whose ``node`` is not a host name (``host[:port]``), or is one
    ``addressing.allow`` does not allow, is left out with a warning: the API
    never chooses an arbitrary URL, nor (by default) this host or its link.
    """
    nodes = []
    for item in workloads:
        if item.usable:
            node = _node_of(item, addressing)
            if node is None:
                log.warn("workload {workload} names no usable node; left out", workload=item.workload[:64])
            elif not addressing.allow.allows(item.node):
                log.warn("workload {workload} names node {node}, which WORKLOADS_NODE_ALLOW does not allow; "
                         "left out", workload=item.workload[:64], node=item.node)
            else:
                nodes.append(node)
    return tuple(nodes)
