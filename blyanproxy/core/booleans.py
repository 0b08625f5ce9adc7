"""The boolean words of settings and knobs, written once: ``true/false``, ``yes/no``, ``on/off``, ``1/0``."""

from __future__ import annotations

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def boolean_word(text: str) -> bool | None:
    """What ``text`` means as a boolean word, or ``None`` when it is not one.

    Case and surrounding white space are ignored (``" Yes "`` is true).
    """
    lowered = text.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    return None


def parse_boolean(text: str) -> bool:
    """The meaning of a boolean word; ``ValueError`` for any other text."""
    meaning = boolean_word(text)
    if meaning is None:
        raise ValueError("expected true or false")
    return meaning
