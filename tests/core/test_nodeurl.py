"""Node base URL validation."""

import pytest

from blyanproxy.core.nodeurl import parse_base_url


def test_parts_and_text():
    url = parse_base_url("https://GPU1.example.com:8443/prefix/")
    assert (url.scheme, url.host, url.port, url.path) == ("https", "gpu1.example.com", 8443, "/prefix")
    assert url.text == "https://gpu1.example.com:8443/prefix"
    assert parse_base_url("http://10.0.0.1:80").text == "http://10.0.0.1"
    assert parse_base_url("http://[::1]:8000").netloc == "[::1]:8000"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "non-empty"),
        ("gpu1:8000", "http:// or https://"),
        ("http://user:pw@gpu1", "credentials"),
        ("http://gpu1/?target=x", "query"),
        ("http://gpu1/#x", "fragment"),
        ("http://gpu 1", "spaces"),
        ("http://gpu1\r\nX: y", "control"),
        ("http:///path", "no host"),
        ("http://gpu1:99999", "valid URL"),
        ("http://gpu1:0", "port 0"),
        ("http://gpü.example.com", "ASCII"),
    ],
)
def test_refusals(text, reason):
    with pytest.raises(ValueError) as caught:
        parse_base_url(text)
    assert reason in str(caught.value)
