"""The wrappers of private Twisted APIs behave as the proxy relies on (checked on each Twisted upgrade)."""

import pytest
from twisted.internet.task import Clock

from blyanproxy.twistedinternals import body_decoder, quiet_connection_pool


def decode(length, chunked, *pieces):
    body, done = [], []
    decoder = body_decoder(length, chunked, body.append, done.append)
    for piece in pieces:
        decoder.dataReceived(piece)
    return decoder, b"".join(body), done


def test_a_chunked_body_is_decoded_and_its_end_reported_with_what_follows():
    _, body, done = decode(None, True, b"5\r\nhel", b"lo\r\n0\r\n\r\nNEXT")
    assert body == b"hello" and done == [b"NEXT"]


def test_a_body_of_known_length_ends_at_its_length():
    _, body, done = decode(5, False, b"hel", b"loNEXT")
    assert body == b"hello" and done == [b"NEXT"]


def test_a_body_cut_short_raises_at_the_end_of_the_connection():
    decoder, body, done = decode(10, False, b"hello")
    assert body == b"hello" and done == []
    with pytest.raises(Exception):  # noqa: B017  (Twisted raises its _DataLoss)
        decoder.noMoreData()
    chunked, _, _ = decode(None, True, b"5\r\nhel")
    with pytest.raises(Exception):  # noqa: B017
        chunked.noMoreData()


def test_a_body_ended_by_the_close_is_complete_when_the_connection_ends():
    decoder, body, done = decode(None, False, b"all ", b"of it")
    decoder.noMoreData()
    assert body == b"all of it" and done == [b""]


def test_the_quiet_pool_builds_connections_without_log_lines():
    pool = quiet_connection_pool(Clock(), persistent=False)
    assert pool.persistent is False
    assert pool._factory.noisy is False  # the private attribute this wrapper exists for


def test_the_request_line_target_is_known_while_the_head_arrives_and_gone_after():
    from twisted.internet.testing import StringTransport
    from twisted.web import http

    from blyanproxy.twistedinternals import request_line_target

    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    assert request_line_target(channel) is None
    channel.dataReceived(b"GET /v1/models?x=1 HTTP/1.1\r\nHost: x\r\n")
    assert request_line_target(channel) == b"/v1/models?x=1"
    channel.dataReceived(b"\r\n")  # the request is complete: the channel forgets its line
    assert request_line_target(channel) is None
