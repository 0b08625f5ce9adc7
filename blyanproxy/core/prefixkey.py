"""The prefix key of an inference request: a hash of its prompt's leading part, read with bounded work.

For chat (``"messages"``) the key covers the messages in order, for completions (``"prompt"``) the
prompt, each up to ``PREFIX_BYTES`` of the value's JSON text: requests that share a long system
prompt, or one conversation's later turns, share a key. Only the body's first ``SCAN_BYTES`` are
searched, as ``modelfield`` searches for ``"model"``: an occurrence counts when it is a key of the
top-level object (its brackets balance to depth 1, strings aside), at most ``MAX_KEYS`` of them.
The key hashes that leading part's JSON text without the whitespace between tokens, so the
spacing of a prompt shorter than the bound does not change it. ``None`` when the body has
neither. Same bytes, same key, in every process and on every host. Pure.
"""

from __future__ import annotations

import hashlib
import re

from blyanproxy.core.modelfield import _AFTER_KEY, _STRING, _balance, _escaped

#: How much of the prompt's JSON text the key covers.
PREFIX_BYTES = 2048
#: How far into the body the prompt's key is looked for.
SCAN_BYTES = 64 * 1024
#: Occurrences of a needle examined at most (each costs a count of brackets before it).
MAX_KEYS = 8
_NEEDLES = (b'"messages"', b'"prompt"')
_SPACE = re.compile(rb"[ \t\n\r]+")


def prefix_key(body: bytes) -> bytes | None:
    """The prefix key of a JSON inference body (16 bytes), or ``None`` when it names no prompt."""
    window = body[:SCAN_BYTES]
    for needle in _NEEDLES:
        start = _value_start(window, needle)
        if start is not None:
            text = _compact(window[start:start + PREFIX_BYTES])
            return hashlib.blake2b(needle + b"\x00" + text, digest_size=16).digest()
    return None


def _compact(segment: bytes) -> bytes:
    """``segment`` of JSON text without the whitespace between its tokens (a string cut off at the
    segment's end is kept as it is)."""
    parts = []
    position = 0
    for token in _STRING.finditer(segment):
        parts += [_SPACE.sub(b"", segment[position:token.start()]), token.group(0)]
        position = token.end()
    tail = segment[position:]
    quote = tail.find(b'"')
    parts.append(_SPACE.sub(b"", tail) if quote == -1 else _SPACE.sub(b"", tail[:quote]) + tail[quote:])
    return b"".join(parts)


def _value_start(window: bytes, needle: bytes) -> int | None:
    """Where the value of the top-level key ``needle`` starts in ``window``, or ``None``."""
    found = window.find(needle)
    seen = 0
    while found != -1 and seen < MAX_KEYS:
        after = _AFTER_KEY.match(window, found + len(needle))
        if after is not None and not _escaped(window, found):
            seen += 1
            if _balance(window[:found]) == 1:
                return after.end()
        found = window.find(needle, found + 1)
    return None
