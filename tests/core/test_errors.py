"""The error shapes: the proxy's own, OpenAI's and Ollama's, as documents and raw responses."""

import json

import pytest

from blyanproxy.core import DIALECT_OLLAMA, DIALECT_OPENAI, DIALECT_PLAIN, ProxyError, openai_error_type


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (404, "invalid_request_error"), (405, "invalid_request_error"),
    (408, "invalid_request_error"), (413, "invalid_request_error"), (422, "invalid_request_error"),
    (401, "authentication_error"), (403, "permission_error"), (429, "rate_limit_error"),
    (500, "server_error"), (502, "server_error"), (503, "server_error"), (504, "server_error"),
])
def test_the_openai_type_follows_the_status_as_openai_answers(status, kind):
    assert openai_error_type(status) == kind


def test_each_dialect_has_its_shape():
    error = ProxyError(400, "bad_node_choice", "api= must name one node", param="api")
    assert error.document() == {"error": "api= must name one node", "code": "bad_node_choice"}
    assert error.document(DIALECT_PLAIN, "r1") == {"error": "api= must name one node", "code": "bad_node_choice",
                                           "request_id": "r1"}
    assert error.document(DIALECT_OPENAI, "r1") == {
        "error": {"message": "api= must name one node", "type": "invalid_request_error", "param": "api",
                  "code": "bad_node_choice"},
        "request_id": "r1",
    }
    assert error.document(DIALECT_OLLAMA, "r1") == {"error": "api= must name one node"}
    assert json.loads(error.body(DIALECT_OPENAI)) == error.document(DIALECT_OPENAI)


def test_a_raw_response_carries_the_shape_the_id_and_closes():
    raw = ProxyError(413, "body_too_large", "too big").raw_response(DIALECT_OPENAI, "r9")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 413 Content Too Large"
    assert b"X-Request-Id: r9" in lines and b"Connection: close" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert b"X-Request-Id" not in ProxyError(408, "request_timeout", "slow").raw_response()
    assert ProxyError(408, "request_timeout", "slow").raw_response().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
