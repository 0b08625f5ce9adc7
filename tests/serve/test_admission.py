"""Admission from the settings: caps' default, rate limits and the overrides file, at start and on SIGHUP."""

import json

import attrs
import pytest
from twisted.internet.task import Clock

from blyanproxy.config import Settings
from blyanproxy.core import Node, NodeRegistry, RateLimit
from blyanproxy.fleet import Balancer
from blyanproxy.serve import build_admission
from blyanproxy.serve.reload import restart_needed

NODE = Node(id="n1", name="gpu", base_url="http://10.0.0.1:8000")


def balancer():
    registry = NodeRegistry()
    registry.add(NODE)
    return Balancer(registry, Clock())


def test_the_settings_reach_the_pools_and_the_limiter(tmp_path):
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"key-0123456789": {"rpm": 600}}))
    pool = balancer()
    settings = attrs.evolve(Settings(), node_max_inflight=4, rate_limit_rpm=60, rate_limit_file=str(limits))
    made = build_admission(settings, Clock(), [pool], None)
    limiter = made.admission.limiter
    assert pool.cap_of(NODE) == 4
    assert pool.on_slot_freed == made.admission.queue.slot_freed
    assert limiter.default == RateLimit(rpm=60)
    assert limiter.limit_of("key-0123456789") == RateLimit(rpm=600)

    limits.write_text(json.dumps({"key-0123456789": {"tpm": 1000}}))
    assert made.apply(attrs.evolve(settings, node_max_inflight=0, rate_limit_rpm=0))
    assert pool.default_cap is None
    assert limiter.default == RateLimit()
    assert limiter.limit_of("key-0123456789") == RateLimit(tpm=1000)

    limits.write_text("{not json")
    assert not made.apply(settings)  # a bad file: the overrides stay as they were
    assert limiter.limit_of("key-0123456789") == RateLimit(tpm=1000)


def test_a_bad_overrides_file_stops_the_start(tmp_path):
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"key-a": {"rpm": -1}}))
    with pytest.raises(ValueError):
        build_admission(attrs.evolve(Settings(), rate_limit_file=str(limits)), Clock(), [balancer()], None)


def test_sighup_applies_the_caps_default_and_the_limits_without_a_restart():
    old = Settings()
    new = attrs.evolve(old, node_max_inflight=3, rate_limit_rpm=5, rate_limit_tpm=9, rate_limit_file="x.json",
                       queue_max=7)
    assert restart_needed(old, new) == ["QUEUE_MAX"]
