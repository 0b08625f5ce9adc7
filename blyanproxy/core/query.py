"""Query strings as bytes: split into parameters, names and values form-decoded, total on any input.

Nothing here decodes text: a name or value is the bytes its percent-escapes
spell (``+`` a space), whatever they are, so no client input can make these
functions fail. Callers that need text decide how to read the bytes.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes


def query_parameters(query: bytes) -> list[tuple[bytes, bytes | None]]:
    """The raw ``(name, value)`` parameters of a query, in order (``value`` None without ``=``).

    Parameters are separated by ``&`` only; empty ones (``a=1&&b``) are skipped.
    """
    parameters: list[tuple[bytes, bytes | None]] = []
    for part in query.split(b"&"):
        if not part:
            continue
        name, sep, value = part.partition(b"=")
        parameters.append((name, value if sep else None))
    return parameters


def form_decoded(raw: bytes) -> bytes:
    """A query name or value as the bytes it spells: ``+`` is a space, ``%XX`` a byte."""
    return unquote_to_bytes(raw.replace(b"+", b" "))
