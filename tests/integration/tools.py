"""External programs some integration tests drive (nginx, etcd, shellcheck)."""

from __future__ import annotations

import os
import shutil

import pytest

#: Set by ``.ci/run``: a missing program fails the test instead of skipping it.
STRICT_ENV = "BLYANPROXY_REQUIRE_TOOLS"


def require_program(name: str) -> str:
    """The path of program ``name``; skips the test when it is not installed.

    With ``BLYANPROXY_REQUIRE_TOOLS=1`` in the environment (as in CI) a
    missing program is a failure, so those tests can never pass by skipping.
    """
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found:
        return found
    message = f"{name} is not installed"
    if os.environ.get(STRICT_ENV) == "1":
        pytest.fail(message + f" ({STRICT_ENV}=1)")
    pytest.skip(message)


def require_module(name: str, extra: str) -> None:
    """Skip the test when Python module ``name`` (from the ``extra`` extra) is not installed.

    With ``BLYANPROXY_REQUIRE_TOOLS=1`` (as in CI, which installs the extra) it is a failure.
    """
    import importlib.util

    if importlib.util.find_spec(name) is not None:
        return
    message = f"{name} is not installed (pip install -e '.[{extra}]')"
    if os.environ.get(STRICT_ENV) == "1":
        pytest.fail(message + f" ({STRICT_ENV}=1)")
    pytest.skip(message)
