"""The ``model`` a JSON request body names, found without parsing the whole body.

``model_of(body)`` is what ``json.loads(body)["model"]`` gives when that is a
string, and ``None`` otherwise; it never raises. A chat request's prompt may be
hundreds of kilobytes, and the openai SDK writes ``model`` after ``messages``,
so the body is searched from its end for ``"model"`` (``bytes.rfind``, no
copy); for each occurrence that is a key, only the brackets on its shorter
side are counted (with that side's strings removed) to know whether it is a
key of the top-level object, and only its value is decoded.

Why this agrees with ``json.loads`` on valid JSON: a quote that is not escaped
(not after an odd run of backslashes) followed by ``model"`` and ``:`` opens an
object key; the text on either side of it is whole tokens, so removing its
strings leaves exactly its brackets. The last top-level key wins, as in
``json.loads``. Two exceptions are parsed in full: a body in UTF-16 or UTF-32
(which ``json.loads`` also reads), and one with more than ``MAX_KEYS`` keys
named ``model``. A key spelled with escapes (``"mod\\u0065l"``) is not seen
as ``model``: finding those would cost a scan of every body, and such a
request is merely routed as one that names no model. Pure.
"""

from __future__ import annotations

import json
import re

_NEEDLE = b'"model"'
#: What may follow the key's closing quote: JSON whitespace, ``:``, whitespace.
_AFTER_KEY = re.compile(rb"[ \t\n\r]*:[ \t\n\r]*")
#: A whole JSON string token (unrolled, linear).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: More keys named ``model`` than this: the body is parsed in full (bounds the work).
MAX_KEYS = 8


def model_of(body: bytes) -> str | None:
    """The top-level ``"model"`` string of a JSON body, or ``None`` (no such string, or not JSON)."""
    if len(body) >= 2 and (b"\x00" in body[:4] or body[:2] in (b"\xff\xfe", b"\xfe\xff")):
        return _parsed_model(body)  # UTF-16/32: json.loads reads it, the byte scan cannot
    size = len(body)
    keys = 0
    found = body.rfind(_NEEDLE)
    while found != -1:
        after = _AFTER_KEY.match(body, found + len(_NEEDLE))
        if after is not None and not _escaped(body, found):
            keys += 1
            if keys > MAX_KEYS:
                return _parsed_model(body)
            if found <= size - found:
                depth = _balance(body[:found])
            else:
                depth = -_balance(body[found:])
            if depth == 1:
                return _string_at(body, after.end())
        found = body.rfind(_NEEDLE, 0, found)
    return None


def _escaped(body: bytes, quote: int) -> bool:
    """Whether the quote at ``quote`` follows an odd run of backslashes (it is inside a string)."""
    run = 0
    while quote - run > 0 and body[quote - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


def _balance(segment: bytes) -> int:
    """Openings minus closings in ``segment`` (which starts outside a string), strings aside."""
    bare = _STRING.sub(b"", segment)
    return bare.count(b"{") + bare.count(b"[") - bare.count(b"}") - bare.count(b"]")


def _string_at(body: bytes, position: int) -> str | None:
    """The JSON string that starts at ``position``, decoded; ``None`` when none starts there."""
    token = _STRING.match(body, position)
    if token is None:
        return None
    try:
        value = json.loads(token.group(0))
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _parsed_model(body: bytes) -> str | None:
    """``model_of`` by a full parse (bodies the byte scan does not read)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None
