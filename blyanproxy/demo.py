"""``--demo N``: simulated GPU nodes started on loopback ports and registered with the proxy."""

from __future__ import annotations

from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults

from blyanproxy.core import Node, NodeRegistry, new_node_id
from blyanproxy.devnode import DevNodeConfig, listen_devnode
from blyanproxy.logs import logger

log = logger("tap")


#: The demo's mixed fleet: node ``i`` runs ``DEMO_FLEET[i % 2]`` (an engine and the model it serves).
DEMO_FLEET = (("vllm", "demo-chat"), ("llamacpp", "demo-code"))


def demo_node_name(index: int) -> str:
    """The name of the ``index``-th simulated node of ``--demo``."""
    return f"demo-{index}"


class DemoNodesService(Service):
    """Starts simulated nodes on free loopback ports and registers them (``--demo N``).

    The fleet is mixed: two engine kinds serving two models (``DEMO_FLEET``),
    each registered as ``auto`` so the proxy detects its engine and learns its model.
    """

    def __init__(self, reactor, registry: NodeRegistry, count: int) -> None:
        self._reactor = reactor
        self._registry = registry
        self._count = count
        self._ports: list = []

    def startService(self) -> None:
        super().startService()
        for index in range(self._count):
            engine, model = DEMO_FLEET[index % len(DEMO_FLEET)]
            config = DevNodeConfig(name=demo_node_name(index), engine=engine, models=(model,))
            _, port = listen_devnode(self._reactor, config)
            self._ports.append(port)
            url = f"http://127.0.0.1:{cast(IPv4Address, port.getHost()).port}"
            self._registry.add(
                Node(id=new_node_id(), name=config.name, base_url=url, added_at=self._reactor.seconds())
            )
            log.info("demo node {name} ({engine}, model {model}) listening on {url}",
                     name=config.name, engine=engine, model=model, url=url)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self._ports = self._ports, []
        return gatherResults([port.stopListening() for port in ports])
