"""twistd plugins: ``twistd -n blyan-proxy`` and ``twistd -n blyan-devnode``."""

from twisted.application.service import ServiceMaker

BlyanProxy = ServiceMaker(
    "blyan-proxy",
    "blyanproxy.tap",
    "Streaming reverse proxy and load balancer for GPU inference nodes",
    "blyan-proxy",
)

BlyanDevNode = ServiceMaker(
    "blyan-devnode",
    "blyanproxy.devnode.tap",
    "A simulated GPU inference node (OpenAI and Ollama style) for demos and tests",
    "blyan-devnode",
)
