"""The WebSocket handshake check: only a node's 101 that answers this client's key is spliced."""

from blyanproxy.core.handshake import handshake_problem, websocket_accept

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
GOOD = [(b"Upgrade", [b"WebSocket"]), (b"Connection", [b"keep-alive, Upgrade"]),
        (b"Sec-WebSocket-Accept", [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="])]


def test_the_accept_value_is_rfc_6455s():
    assert websocket_accept(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3's example


def test_a_complete_handshake_passes():
    assert handshake_problem([KEY], GOOD) is None


def test_every_missing_or_wrong_part_is_named():
    without = lambda name: [(n, v) for n, v in GOOD if n != name]  # noqa: E731
    cases = {
        "no key": ([], GOOD),
        "two keys": ([KEY, KEY], GOOD),
        "no upgrade": ([KEY], without(b"Upgrade")),
        "h2c": ([KEY], [(b"Upgrade", [b"h2c"])] + without(b"Upgrade")),
        "two protocols": ([KEY], [(b"Upgrade", [b"websocket, h2c"])] + without(b"Upgrade")),
        "no connection": ([KEY], without(b"Connection")),
        "no accept": ([KEY], without(b"Sec-WebSocket-Accept")),
        "another key's accept": ([b"x" + KEY], GOOD),
        "two accepts": ([KEY], GOOD + [(b"Sec-WebSocket-Accept", [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="])]),
    }
    for why, (keys, headers) in cases.items():
        assert handshake_problem(keys, headers) is not None, why
