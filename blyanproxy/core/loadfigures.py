"""Load figures an engine reports about itself, read from its own answer. Pure, total on any text.

Each engine has one load source (``LOAD_SOURCES``) and the names its source uses:

- vLLM ``/metrics``: ``vllm:num_requests_waiting``, ``vllm:num_requests_running``,
  ``vllm:kv_cache_usage_perc`` (older releases: ``vllm:gpu_cache_usage_perc``);
- SGLang ``/metrics`` (``--enable-metrics``): ``sglang:num_queue_reqs``, ``sglang:num_running_reqs``,
  ``sglang:token_usage``;
- llama.cpp ``/metrics`` (``--metrics``): ``llamacpp:requests_deferred``,
  ``llamacpp:requests_processing``, ``llamacpp:kv_cache_usage_ratio``; without ``--metrics`` it
  answers 501, and ``/slots`` is read instead (busy slots: ``is_processing``);
- TGI ``/metrics``: ``tgi_queue_size``, ``tgi_batch_current_size``;
- Ollama ``/api/ps``: the models in memory (it reports no queue; a loaded model counts as running).

Samples of one name are summed over their labels (one vLLM process may serve several engines).
A parse that fails, or an answer that names none of the engine's figures, reads as ``None``.
"""

from __future__ import annotations

import json
import math

import attrs
from prometheus_client.parser import text_string_to_metric_families

from blyanproxy.core import engines


@attrs.frozen
class LoadFigures:
    """What one node said about its own load: requests queued, requests running, KV-cache use
    (0 to 1); ``None`` where its engine does not say. ``at`` is when the figures were read."""

    waiting: float | None = None
    running: float | None = None
    kv_use: float | None = None
    at: float = 0.0


@attrs.frozen
class MetricNames:
    """The Prometheus names of an engine's queue, running and KV-use figures (older names after)."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_use: tuple[str, ...] = ()


METRIC_NAMES: dict[str, MetricNames] = {
    engines.VLLM: MetricNames(("vllm:num_requests_waiting",), ("vllm:num_requests_running",),
                              ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    engines.SGLANG: MetricNames(("sglang:num_queue_reqs",), ("sglang:num_running_reqs",), ("sglang:token_usage",)),
    engines.LLAMACPP: MetricNames(("llamacpp:requests_deferred",), ("llamacpp:requests_processing",),
                                  ("llamacpp:kv_cache_usage_ratio",)),
    engines.TGI: MetricNames(("tgi_queue_size",), ("tgi_batch_current_size",)),
}

#: Where each engine's load figures are read, in order (the next is tried when one gives nothing).
LOAD_SOURCES: dict[str, tuple[str, ...]] = {
    engines.VLLM: ("/metrics",),
    engines.SGLANG: ("/metrics",),
    engines.LLAMACPP: ("/metrics", "/slots"),
    engines.TGI: ("/metrics",),
    engines.OLLAMA: ("/api/ps",),
}


def load_paths(engine: str | None) -> tuple[str, ...]:
    """The paths to read ``engine``'s load from, in order (none: the engine reports no load)."""
    return LOAD_SOURCES.get(engine or "", ())


def _samples(text: str) -> dict[str, float]:
    """Sum of the finite sample values of each metric name in Prometheus text (``{}`` if it does not parse)."""
    sums: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                value = float(sample.value)
                if math.isfinite(value):
                    sums[sample.name] = sums.get(sample.name, 0.0) + value
    except Exception:  # the parser raises several kinds on bad text; any of them means "no figures"
        return {}
    return sums


def _first(sums: dict[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        if name in sums:
            return sums[name]
    return None


def from_metrics(engine: str, text: str, at: float) -> LoadFigures | None:
    """The figures in ``engine``'s ``/metrics`` text, or ``None`` when it names none of them."""
    names = METRIC_NAMES.get(engine)
    if names is None:
        return None
    sums = _samples(text)
    figures = LoadFigures(_first(sums, names.waiting), _first(sums, names.running), _first(sums, names.kv_use), at)
    if figures.waiting is None and figures.running is None and figures.kv_use is None:
        return None
    return figures


def _document(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def from_slots(body: bytes, at: float) -> LoadFigures | None:
    """llama.cpp's ``/slots``: the slots processing a request are running; it shows no queue."""
    document = _document(body)
    if not isinstance(document, list):
        return None
    busy = sum(1 for slot in document if isinstance(slot, dict) and slot.get("is_processing") is True)
    return LoadFigures(running=float(busy), at=at)


def from_ollama_ps(body: bytes, at: float) -> LoadFigures | None:
    """Ollama's ``/api/ps``: the models in memory count as running."""
    document = _document(body)
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        return None
    return LoadFigures(running=float(len(document["models"])), at=at)


def figures_from(engine: str, path: str, status: int, body: bytes, at: float) -> LoadFigures | None:
    """The figures one answer of ``path`` gives for ``engine`` (``None``: none; try the next source)."""
    if status != 200:
        return None
    if path == "/slots":
        return from_slots(body, at)
    if path == "/api/ps":
        return from_ollama_ps(body, at)
    return from_metrics(engine, body.decode("utf-8", "replace"), at)


def fresh(figures: LoadFigures | None, now: float, interval: float) -> LoadFigures | None:
    """``figures`` while they are at most three intervals old, else ``None`` (unknown)."""
    if figures is None or now - figures.at > 3 * interval:
        return None
    return figures
