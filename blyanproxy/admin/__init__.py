"""The admin API under ``/_admin`` (Klein, behind the token) and the public read-only endpoints."""

from __future__ import annotations

from blyanproxy.admin.api import AdminAPI
from blyanproxy.admin.auth import (
    FailureThrottle,
    load_or_create_token,
    presented_token,
    token_file_path,
    token_matches,
)
from blyanproxy.admin.public import HealthView, LivenessView, StatusView, WorkloadsView

__all__ = [
    "AdminAPI",
    "FailureThrottle",
    "HealthView",
    "LivenessView",
    "StatusView",
    "WorkloadsView",
    "load_or_create_token",
    "presented_token",
    "token_file_path",
    "token_matches",
]
