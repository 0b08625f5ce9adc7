"""Token usage as a node's answer reports it, read from the end of the body as it passes.

OpenAI-style answers carry ``"usage": {"prompt_tokens": …, "completion_tokens": …}``
at the end of a JSON body or in the last SSE event (``stream_options.include_usage``);
Ollama's last object carries ``prompt_eval_count`` and ``eval_count``. A
``UsageTail`` keeps a bounded copy of the last bytes passed (nothing is held
back from the client) and reads the figures once the body has ended.
"""

from __future__ import annotations

import re

import attrs

#: How many of the last body bytes are kept to find the usage in.
TAIL_BYTES = 2048

_FIELDS = re.compile(rb'"(prompt_tokens|completion_tokens|prompt_eval_count|eval_count)"\s*:\s*(\d{1,12})')
_INPUT = {b"prompt_tokens", b"prompt_eval_count"}


@attrs.frozen
class Usage:
    """Prompt (``tokens_in``) and completion (``tokens_out``) tokens of one answer."""

    tokens_in: int
    tokens_out: int

    @property
    def total(self) -> int:
        """Both together."""
        return self.tokens_in + self.tokens_out


def usage_in(tail: bytes) -> Usage | None:
    """The usage the last of these bytes report (the last figure of each kind wins), or None."""
    found: dict[bool, int] = {}
    for match in _FIELDS.finditer(tail):
        found[match.group(1) in _INPUT] = int(match.group(2))
    if not found:
        return None
    return Usage(found.get(True, 0), found.get(False, 0))


class UsageTail:
    """The last ``TAIL_BYTES`` of a body, fed piece by piece."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> None:
        """Another piece of the body went by."""
        if len(data) >= TAIL_BYTES:
            self._tail = data[-TAIL_BYTES:]
        else:
            self._tail = (self._tail + data)[-TAIL_BYTES:]

    def usage(self) -> Usage | None:
        """What the body's end reports (see ``usage_in``)."""
        return usage_in(self._tail)
