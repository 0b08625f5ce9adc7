"""The admin token: where it comes from, how a request presents it, and throttling of failures."""

from __future__ import annotations

import hmac
import math
import os
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING, cast

from blyanproxy.core import ForwardTrust, client_facts
from blyanproxy.logs import logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.iweb import IRequest
    from twisted.web.server import Request

log = logger("admin")

TOKEN_FILE_NAME = "admin_token"


def token_file_path(token_file: str | None, state_file: str) -> str:
    """Where the admin token is kept: ``ADMIN_TOKEN_FILE``, else ``admin_token`` beside the state file."""
    return token_file or os.path.join(os.path.dirname(os.path.abspath(state_file)), TOKEN_FILE_NAME)


def load_or_create_token(explicit: str | None, token_file: str | None, state_file: str) -> str:
    """``ADMIN_TOKEN`` if set; else the token file's content; else a new token written there.

    The file (default: ``admin_token`` beside the state file) is created with mode
    0600 and reused on the next start. The log names the file, never the token.
    """
    if explicit:
        return explicit
    path = token_file_path(token_file, state_file)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as source:
            token = source.read().strip()
        if len(token) < 16:
            raise ValueError(f"admin token file {path} holds no usable token (16 characters or more)")
        return token
    os.makedirs(os.path.dirname(path), exist_ok=True)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as target:
        target.write(token + "\n")
    log.info("generated an admin token and stored it in {path} (mode 0600)", path=path)
    return token


def presented_token(request: IRequest) -> bytes | None:
    """The token a request carries in ``X-Admin-Token`` or ``Authorization: Bearer``."""
    header = request.getHeader(b"x-admin-token")
    if header:
        return header.strip()
    authorization = request.getHeader(b"authorization") or b""
    scheme, _, credentials = authorization.partition(b" ")
    if scheme.lower() == b"bearer" and credentials.strip():
        return credentials.strip()
    return None


def token_matches(presented: bytes | None, token: str) -> bool:
    """Constant-time comparison (also when nothing was presented)."""
    return hmac.compare_digest(presented or b"", token.encode("utf-8"))


class FailureThrottle:
    """Refuses a client address while ``limit`` failed attempts from it are under ``window`` seconds old.

    The address is the client's as ``trust`` (``TRUST_FORWARDED``) reads it
    (``address_of``): behind a trusted reverse proxy, the forwarded client, so
    one client's wrong tokens never lock every admin out. The refusal ends
    when the oldest of those failures is ``window`` seconds old. At most
    ``max_addresses`` addresses are remembered (the oldest are forgotten).
    Each process (each worker) keeps its own throttle.
    """

    def __init__(
        self, clock: IReactorTime, limit: int = 10, window: float = 60.0, max_addresses: int = 10000,
        trust: bool | ForwardTrust = False,
    ) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window
        self._max = max_addresses
        self._trust = trust
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def address_of(self, request: IRequest) -> str:
        """The address ``request``'s failures are counted against."""
        # Klein hands over twisted.web's Request, which has all that client_facts reads (IRequest
        # does not declare received_cookies).
        return client_facts(cast("Request", request), self._trust).origin

    def _recent(self, address: str) -> list[float]:
        now = self._clock.seconds()
        times = [t for t in self._failures.get(address, []) if now - t < self._window]
        if times:
            self._failures[address] = times
        else:
            self._failures.pop(address, None)
        return times

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None when it may now."""
        times = self._recent(address)
        if len(times) < self._limit:
            return None
        # Refused until fewer than ``limit`` remain: until this one ages out (the oldest, at ``limit``).
        ages_out = times[len(times) - self._limit] + self._window
        return max(1, math.ceil(ages_out - self._clock.seconds()))

    def failed(self, address: str) -> None:
        """Record a failed attempt from ``address``."""
        times = self._recent(address)
        times.append(self._clock.seconds())
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)
