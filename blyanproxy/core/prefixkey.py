"""The prefix key of an inference request: a hash of its prompt's leading part, read with bounded work.

For chat (``"messages"``) the key covers the messages in order, for completions (``"prompt"``) the
prompt, each up to ``PREFIX_BYTES`` of the value's JSON text: requests that share a long system
prompt, or one conversation's later turns, share a key. Only the body's first ``SCAN_BYTES`` are
searched, as ``modelfield`` searches for ``"model"``: an occurrence counts when it is a key of the
top-level object (its brackets balance to depth 1, strings aside), at most ``MAX_KEYS`` of them.
The key hashes the JSON strings of that leading part (keys and values, in order), so spacing
between tokens does not change it; a value with no string (token ids) hashes its text without
whitespace. ``None`` when the body has neither. Same bytes, same key, in every process. Pure.
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
            segment = window[start:start + PREFIX_BYTES]
            strings = _STRING.findall(segment)
            text = b"\x00".join(strings) if strings else _SPACE.sub(b"", segment)
            return hashlib.blake2b(needle + b"\x00" + text, digest_size=16).digest()
    return None


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
