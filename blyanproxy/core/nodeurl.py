"""Validation of a node's base URL and the parts the proxy needs from it."""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs

_CONTROL = frozenset(chr(c) for c in range(0x21)) | {"\x7f"}


@attrs.frozen
class BaseURL:
    """A node's validated base URL: scheme, host, port and an optional path prefix.

    ``path`` never ends in ``/`` (the empty string for the root), so an upstream
    path is always ``base.path + request_path``.
    """

    scheme: str
    host: str
    port: int
    path: str

    @property
    def netloc(self) -> str:
        """Host and port as written in a URL, the port left out when it is the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def path_bytes(self) -> bytes:
        """The path prefix as bytes, ready to put before a request target."""
        return self.path.encode("ascii")

    @property
    def text(self) -> str:
        """The URL as text."""
        return f"{self.scheme}://{self.netloc}{self.path}"


def parse_base_url(text: str) -> BaseURL:
    """Parse and check a node base URL, raising ``ValueError`` with the reason.

    Accepted: ``http`` or ``https``, a host, an optional port and path. Refused:
    credentials, a query or fragment, white space or control characters.
    A trailing ``/`` is dropped.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("must be a non-empty http(s) URL")
    if any(ch in _CONTROL for ch in text):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("must not carry credentials")
    if not parts.hostname:
        raise ValueError("has no host")
    if not parts.hostname.isascii():
        raise ValueError("host must be ASCII (write an international name in punycode)")
    if not text.isascii():
        raise ValueError("must be ASCII (percent-encode the path, punycode the host)")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("must not have a query or fragment")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    elif port == 0:
        raise ValueError("port 0 is not a valid node port")
    return BaseURL(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        path=parts.path.rstrip("/"),
    )
