"""The status page for people (``GET /_admin/ui``): one HTML file and the headers it is served with.

The page (``ui.html``, package data) holds its script and style inline and no
secret: it asks for the admin token in the browser and sends it with each
admin API call. Its Content-Security-Policy allows exactly that script and that
style (by their SHA-256), fetches to this origin, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import attrs


@attrs.frozen
class StaticPage:
    """A page's bytes and the response headers it is always served with."""

    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]


def inline_source(html: str, tag: str) -> str:
    """The CSP source (``'sha256-…'``) that allows the one inline ``<tag>`` element of ``html``.

    ``ValueError`` unless the page has exactly one ``<tag>`` element, written without attributes.
    """
    opened = len(re.findall(rf"<{tag}\b", html))
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    if opened != 1 or len(found) != 1:
        raise ValueError(f"the page must have exactly one <{tag}> element without attributes ({opened} found)")
    digest = hashlib.sha256(found[0].encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def status_page(html: str) -> StaticPage:
    """``html`` as a page that may run its inline script and style, call this origin, and nothing more."""
    policy = "; ".join((
        "default-src 'none'",
        f"script-src {inline_source(html, 'script')}",
        f"style-src {inline_source(html, 'style')}",
        "connect-src 'self'",
        "img-src data:",  # the empty icon, so no browser asks the proxy for /favicon.ico
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ))
    return StaticPage(html.encode("utf-8"), (
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-security-policy", policy.encode("ascii")),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"cache-control", b"no-store"),
    ))


STATUS_PAGE = status_page((Path(__file__).parent / "ui.html").read_text(encoding="utf-8"))
