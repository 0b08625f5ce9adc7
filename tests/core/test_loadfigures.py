"""Engine load figures read from each engine's own answer: names, sources, totality, freshness."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.core import LoadFigures, figures_from, fresh, load_paths
from blyanproxy.core.loadfigures import METRIC_NAMES

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="m"} 12345.0
"""

OLD_VLLM = """vllm:num_requests_running{model_name="m"} 1.0
vllm:num_requests_waiting{model_name="m"} 0.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
"""


def test_vllm_figures_sum_over_labels_and_read_either_kv_gauge():
    assert figures_from("vllm", "/metrics", 200, VLLM.encode(), 9.0) == LoadFigures(7.0, 5.0, 0.25, 9.0)
    assert figures_from("vllm", "/metrics", 200, OLD_VLLM.encode(), 1.0) == LoadFigures(0.0, 1.0, 0.5, 1.0)


@pytest.mark.parametrize("engine, text, expected", [
    ("sglang", 'sglang:num_running_reqs{model_name="m"} 4\nsglang:num_queue_reqs{model_name="m"} 2\n'
               'sglang:token_usage{model_name="m"} 0.75\n', (2.0, 4.0, 0.75)),
    ("llamacpp", "llamacpp:requests_processing 1\nllamacpp:requests_deferred 3\n"
                 "llamacpp:kv_cache_usage_ratio 0.1\n", (3.0, 1.0, 0.1)),
    ("tgi", "# TYPE tgi_queue_size gauge\ntgi_queue_size 5\n# TYPE tgi_batch_current_size gauge\n"
            "tgi_batch_current_size 8\n", (5.0, 8.0, None)),
])
def test_each_engine_is_read_in_its_own_names(engine, text, expected):
    figures = figures_from(engine, "/metrics", 200, text.encode(), 0.0)
    assert figures is not None and (figures.waiting, figures.running, figures.kv_use) == expected


def test_llamacpp_slots_and_ollama_ps():
    slots = json.dumps([{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}]).encode()
    assert figures_from("llamacpp", "/slots", 200, slots, 2.0) == LoadFigures(running=1.0, at=2.0)
    ps = json.dumps({"models": [{"name": "a"}, {"name": "b"}]}).encode()
    assert figures_from("ollama", "/api/ps", 200, ps, 2.0) == LoadFigures(running=2.0, at=2.0)
    assert load_paths("llamacpp") == ("/metrics", "/slots") and load_paths("ollama") == ("/api/ps",)
    assert load_paths(None) == () and load_paths("openai") == ()


@pytest.mark.parametrize("engine, path, status, body", [
    ("vllm", "/metrics", 200, b"sglang:num_running_reqs 1\n"),  # another engine's names
    ("vllm", "/metrics", 503, VLLM.encode()),
    ("llamacpp", "/metrics", 501, b"This server does not support metrics endpoint."),
    ("vllm", "/metrics", 200, b"vllm:num_requests_running{ 1\n"),
    ("llamacpp", "/slots", 200, b'{"not": "a list"}'),
    ("ollama", "/api/ps", 200, b"[]"),
    ("blyan", "/metrics", 200, VLLM.encode()),
])
def test_answers_without_figures_read_as_none(engine, path, status, body):
    assert figures_from(engine, path, status, body, 0.0) is None


@given(st.sampled_from(sorted(METRIC_NAMES)), st.sampled_from(["/metrics", "/slots", "/api/ps"]), st.binary())
def test_reading_is_total_on_any_bytes(engine, path, body):
    figures = figures_from(engine, path, 200, body, 0.0)
    assert figures is None or isinstance(figures, LoadFigures)


@given(st.text())
def test_reading_is_total_on_any_text_after_real_lines(text):
    figures = figures_from("vllm", "/metrics", 200, (VLLM + text).encode("utf-8", "surrogatepass"), 0.0)
    assert figures is None or (isinstance(figures, LoadFigures) and figures.at == 0.0)


def test_figures_older_than_three_intervals_are_unknown():
    figures = LoadFigures(1.0, 2.0, 0.5, at=10.0)
    assert fresh(figures, 13.0, 1.0) == figures
    assert fresh(figures, 13.01, 1.0) is None
    assert fresh(None, 0.0, 1.0) is None
