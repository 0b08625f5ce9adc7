"""Health and drain over real sockets: nodes leave and rejoin rotation, drains let streams finish."""

import pytest_twisted
import treq

from blyanproxy.core.healthstate import UP, usable
from blyanproxy.devnode import DevNodeConfig, listen_devnode

from .rawhttp import connect, eventually, sleep
from .test_forwarding import chat_request


async def served_by(proxy, count=1):
    """The nodes that answered ``count`` requests (a node's path: the proxy answers /v1/models itself)."""
    names = []
    for _ in range(count):
        response = await treq.get(proxy.url + "/_devnode/echo", timeout=5)
        assert response.code == 200
        await response.content()
        names += response.headers.getRawHeaders("X-Blyan-Node")
    return names


@pytest_twisted.ensureDeferred
async def test_a_killed_node_is_out_after_one_failed_request_and_back_after_recovery(
    reactor, devnode_factory, proxy_factory
):
    first, second = devnode_factory(name="a"), devnode_factory(name="b")
    proxy = await proxy_factory(
        [first.url, second.url], health_checks=True, selection_policy="round-robin",
        health_interval=0.1, health_rise=1, eject_cooldown=0.3,
    )
    registry = proxy.registry
    dead, alive = registry.nodes()
    await eventually(reactor, lambda: all(registry.stats(n.id).health.state == UP for n in registry.nodes()))
    await first.stop()
    names = await served_by(proxy, 12)  # every request still succeeds
    assert names.count("node0") == 0
    assert registry.stats(dead.id).failures == 1  # one failed attempt took it out of rotation
    node, port = listen_devnode(reactor, DevNodeConfig(name="a"), port=first.port)
    try:
        await eventually(reactor, lambda: usable(registry.stats(dead.id).health, reactor.seconds()), timeout=5)
        assert "node0" in await served_by(proxy, 4)
    finally:
        await port.stopListening()
        await node.disconnect_all()


@pytest_twisted.ensureDeferred
async def test_a_node_that_fails_its_probes_takes_no_traffic(reactor, devnode_factory, proxy_factory):
    sick, well = devnode_factory(health_status=503), devnode_factory()
    proxy = await proxy_factory([sick.url, well.url], health_checks=True, health_interval=0.1)
    await eventually(reactor, lambda: proxy.registry.stats(proxy.registry.nodes()[0].id).health.state == "down")
    assert await served_by(proxy, 4) == ["node1"] * 4


@pytest_twisted.ensureDeferred
async def test_draining_keeps_a_running_stream_and_sends_new_requests_elsewhere(
    reactor, devnode_factory, proxy_factory
):
    first, second = devnode_factory(tokens_per_second=20.0, ttft_ms=0.0), devnode_factory()
    proxy = await proxy_factory([first.url, second.url])  # active-first: node0 takes new requests
    node0 = proxy.registry.nodes()[0]
    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=10))
    await client.wait_for(b"chat.completion.chunk")
    proxy.registry.update(node0.id, draining=True)
    assert await served_by(proxy, 3) == ["node1"] * 3
    assert proxy.registry.stats(node0.id).in_flight == 1  # what an operator watches before removing it
    received = await client.wait_for(b"data: [DONE]", timeout=5)
    assert b"X-Blyan-Node: node0" in received
    await eventually(reactor, lambda: proxy.registry.stats(node0.id).in_flight == 0)
    client.transport.loseConnection()
    await sleep(reactor, 0)


@pytest_twisted.ensureDeferred
async def test_affinity_keeps_a_session_on_its_node_and_moves_it_only_when_that_node_dies(
    devnode_factory, proxy_factory
):
    from blyanproxy.core.affinity import parse_affinity_source

    nodes = [devnode_factory(name=f"n{i}") for i in range(3)]
    proxy = await proxy_factory([n.url for n in nodes], selection_policy="round-robin",
                                affinity_key=parse_affinity_source("query:ticket_id"))

    async def node_for(ticket):
        seen = set()
        for path in ("/chat/admit", "/queue/stream", "/chat/start"):
            response = await treq.get(f"{proxy.url}/_devnode/echo{path}?ticket_id={ticket}", timeout=5)
            await response.content()
            seen.update(response.headers.getRawHeaders("X-Blyan-Node"))
        assert len(seen) == 1, seen  # every step of the flow on one node
        return seen.pop()

    tickets = [f"t{i}" for i in range(12)]
    before = {ticket: await node_for(ticket) for ticket in tickets}
    assert len(set(before.values())) > 1  # sessions spread over the nodes
    victim = before[tickets[0]]
    await nodes[int(victim[-1])].stop()
    after = {ticket: await node_for(ticket) for ticket in tickets}
    for ticket in tickets:
        if before[ticket] == victim:
            assert after[ticket] != victim
        else:
            assert after[ticket] == before[ticket]
