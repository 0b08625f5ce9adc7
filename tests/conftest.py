"""Fixtures shared by every test module."""

import pytest


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs for the whole session."""
    from twisted.internet import reactor as global_reactor

    return global_reactor
