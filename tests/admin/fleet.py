"""Small fleets for the admin tests: numbered nodes and a registry holding them."""

from blyanproxy.core import Node, NodeRegistry


def node(index, **fields):
    """Node ``n<index>`` named ``node<index>`` at ``http://10.0.0.<index>:8000``."""
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **fields)


def registry_of(*nodes):
    """A registry holding ``nodes``, in order."""
    registry = NodeRegistry()
    for each in nodes:
        registry.add(each)
    return registry
