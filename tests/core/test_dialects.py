"""Which error shape a path gets, and write_error answering in it."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.core import DIALECT_OLLAMA, DIALECT_OPENAI, DIALECT_PLAIN, ProxyError, error_dialect, write_error


@pytest.mark.parametrize(("target", "dialect"), [
    (b"/v1/chat/completions", DIALECT_OPENAI),
    (b"/v1/models?api=gpu-a", DIALECT_OPENAI),
    (b"/v1", DIALECT_OPENAI),
    (b"/api/v1/completions", DIALECT_OPENAI),  # /api is removed: the node sees /v1/completions
    (b"/tags/gpu/v1/chat/completions", DIALECT_OPENAI),
    (b"/tags/gpu/api/v1/embeddings", DIALECT_OPENAI),
    (b"/0/v1/chat/completions", DIALECT_OPENAI),
    (b"/-1/v1/chat/completions", DIALECT_OPENAI),  # refused as a bad index, in the shape its client reads
    (b"/99999999/v1/models", DIALECT_OPENAI),
    (b"http://proxy.example/v1/models", DIALECT_OPENAI),  # absolute form: the path decides
    (b"/api/generate", DIALECT_OLLAMA),
    (b"/api/chat", DIALECT_OLLAMA),
    (b"/api/embed", DIALECT_OLLAMA),
    (b"/api/embeddings", DIALECT_OLLAMA),
    (b"/api/tags", DIALECT_OLLAMA),
    (b"/api/show", DIALECT_OLLAMA),
    (b"/api/ps", DIALECT_OLLAMA),
    (b"/api/blobs/sha256:abc", DIALECT_OLLAMA),
    (b"/tags/gpu/api/chat", DIALECT_OLLAMA),
    (b"/2/api/generate?x=1", DIALECT_OLLAMA),
    (b"/", DIALECT_PLAIN),
    (b"/health/x", DIALECT_PLAIN),
    (b"/v1beta/models", DIALECT_PLAIN),
    (b"/api", DIALECT_PLAIN),
    (b"/api/_admin/nodes", DIALECT_PLAIN),
    (b"/api/unknown", DIALECT_PLAIN),
    (b"/generate", DIALECT_PLAIN),
    (b"/tags", DIALECT_PLAIN),
    (b"/tags/v1", DIALECT_PLAIN),  # the tag is "v1", and nothing follows
    (b"/x/v1/models", DIALECT_PLAIN),
    (b"*", DIALECT_PLAIN),
    (b"", DIALECT_PLAIN),
])
def test_the_path_decides_the_error_shape(target, dialect):
    assert error_dialect(target) == dialect


@given(st.binary(max_size=80))
def test_every_target_has_a_shape(target):
    assert error_dialect(target) in (DIALECT_PLAIN, DIALECT_OPENAI, DIALECT_OLLAMA)
    assert error_dialect(b"/" + target) in (DIALECT_PLAIN, DIALECT_OPENAI, DIALECT_OLLAMA)


def answered(uri, error, request_id=None):
    request = DummyRequest([])
    request.uri = uri
    if request_id is not None:
        request.responseHeaders.setRawHeaders(b"X-Request-Id", [request_id])
    write_error(request, error)
    body = b"".join(request.written)
    assert request.finished and request.responseHeaders.getRawHeaders(b"content-length") == [b"%d" % len(body)]
    return request, json.loads(body)


NO_NODE = ProxyError(503, "no_healthy_nodes", "no healthy node can take the request", retry_after=5)


def test_write_error_answers_an_openai_path_in_openais_shape_with_the_request_id():
    request, body = answered(b"/v1/chat/completions", NO_NODE, b"req-1")
    assert request.responseCode == 503
    assert request.responseHeaders.getRawHeaders(b"retry-after") == [b"5"]
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert body == {"error": {"message": "no healthy node can take the request", "type": "server_error",
                              "param": None, "code": "no_healthy_nodes"}, "request_id": "req-1"}


def test_write_error_answers_an_ollama_path_in_ollamas_shape():
    request, body = answered(b"/api/chat", NO_NODE, b"req-1")
    assert body == {"error": "no healthy node can take the request"}
    assert request.responseHeaders.getRawHeaders(b"x-request-id") == [b"req-1"]  # the id stays in the header


def test_write_error_answers_other_paths_in_the_proxys_own_shape():
    _, body = answered(b"/_devnode/echo", NO_NODE, b"req-1")
    assert body == {"error": "no healthy node can take the request", "code": "no_healthy_nodes",
                    "request_id": "req-1"}
    _, body = answered(b"/metrics", ProxyError(401, "unauthorized", "missing or wrong metrics token"))
    assert body == {"error": "missing or wrong metrics token", "code": "unauthorized"}  # no id: none was given
