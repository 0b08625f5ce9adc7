"""Value parsers of the settings: text in, value out, ``ValueError`` with the reason otherwise.

Each parser (or parser maker, such as ``milliseconds(minimum)``) is total: any
text gives a value or a ``ValueError`` whose message says what was expected,
never the text itself (``reader`` adds it, unless the setting is a secret, with
the credentials of any URL in it masked by ``mask_credentials``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Callable

from blyanproxy.core import parse_base_url
from blyanproxy.logs import LOG_LEVELS

#: Control characters and ``|``: never in a health path or a token.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f|]")

#: The longest duration a setting takes (about 31 years): longer ones are typing mistakes.
MAX_MILLISECONDS = 10**12

#: The user information of a URL (``//user:password@``), never shown in a message.
_CREDENTIALS = re.compile(r"//[^/?#@]*@")


def mask_credentials(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced by ``***``."""
    return _CREDENTIALS.sub("//***@", text)


def milliseconds(minimum: float = 0.0) -> Callable[[str], float]:
    """A parser of a duration in milliseconds, giving seconds, from ``minimum`` seconds up."""

    def parse(text: str) -> float:
        if not re.fullmatch(r"\d+(\.\d+)?", text.strip()):
            raise ValueError("expected a number of milliseconds")
        value = float(text) / 1000.0
        if value < minimum:
            raise ValueError(f"must be at least {minimum * 1000:g} ms")
        if not value * 1000.0 <= MAX_MILLISECONDS:
            raise ValueError(f"must be at most {MAX_MILLISECONDS} ms")
        return value

    return parse


def whole_number(minimum: int, maximum: int) -> Callable[[str], int]:
    """A parser of a whole number written in digits, from ``minimum`` to ``maximum``."""

    def parse(text: str) -> int:
        if not re.fullmatch(r"\d+", text.strip()):
            raise ValueError("expected a whole number")
        value = int(text)
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}")
        return value

    return parse


def factor(text: str) -> float:
    """A decimal number of at least 1."""
    if not re.fullmatch(r"\d+(\.\d+)?", text.strip()) or float(text) < 1.0:
        raise ValueError("expected a number of at least 1")
    return float(text)


def one_of(choices: Sequence[str]) -> Callable[[str], str]:
    """A parser of one of ``choices``, exactly as written."""

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return text

    return parse


def log_level_name(text: str) -> str:
    """A log level name in any case, given in capitals."""
    if text.upper() not in LOG_LEVELS:
        raise ValueError("expected DEBUG, INFO, WARN or ERROR")
    return text.upper()


def absolute_paths(text: str) -> tuple[str, ...]:
    """Comma-separated absolute paths, at least one, without spaces or control characters."""
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    if not paths:
        raise ValueError("expected at least one path")
    for path in paths:
        if not path.startswith("/") or _UNSAFE.search(path) or " " in path:
            raise ValueError(f"{path!r} is not an absolute path")
    return paths


def health_paths(text: str) -> tuple[str, ...]:
    """``auto`` (or nothing): each engine's own health probe, as ``()``; else ``absolute_paths``."""
    if text.strip().lower() in ("", "auto"):
        return ()
    return absolute_paths(text)


def status_ranges(text: str) -> frozenset[int]:
    """HTTP statuses and ranges of them (``200-299,304``), between 100 and 599."""
    statuses: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError("expected statuses or ranges such as 200-299,304")
        first, last = int(low), int(high) if sep else int(low)
        if not 100 <= first <= last <= 599:
            raise ValueError("statuses must lie between 100 and 599")
        statuses.update(range(first, last + 1))
    return frozenset(statuses)


def retry_statuses(text: str) -> frozenset[int]:
    """Comma-separated 5xx statuses, or ``none`` for no status at all."""
    if text.strip().lower() == "none":
        return frozenset()
    statuses: set[int] = set()
    for part in text.split(","):
        if not re.fullmatch(r"5\d\d", part.strip()):
            raise ValueError("expected 5xx status codes separated by commas, or none")
        statuses.add(int(part))
    return frozenset(statuses)


def base_url_text(text: str) -> str:
    """An http(s) base URL (``core.parse_base_url``), as its normal text."""
    return parse_base_url(text).text


def token(text: str) -> str:
    """A secret token: at least 16 characters, no spaces, ``|`` or control characters."""
    if len(text) < 16:
        raise ValueError("must be at least 16 characters")
    if _UNSAFE.search(text) or " " in text:
        raise ValueError("must not contain spaces, '|' or control characters")
    return text


def header_name(text: str) -> str:
    """An HTTP header name (letters, digits and ``-``), lower-cased."""
    name = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", name):
        raise ValueError("expected a header name such as X-Caller-Key")
    return name.lower()


def any_text(text: str) -> str:
    """The text as it is (a file name)."""
    return text


def strports(text: str) -> str:
    """A Twisted strports description such as ``tcp:9000:interface=127.0.0.1``."""
    if not re.fullmatch(r"[a-z0-9]+:\S+", text):
        raise ValueError("expected a strports description such as tcp:9000:interface=127.0.0.1")
    return text
