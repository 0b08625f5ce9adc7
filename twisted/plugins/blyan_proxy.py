"""twistd plugins: ``twistd -n blyan-proxy`` and ``twistd -n blyan-devnode`` (defined in blyanproxy.scripts)."""

from blyanproxy.scripts import BlyanDevNode, BlyanProxy

__all__ = ["BlyanDevNode", "BlyanProxy"]
