"""How a simulated node speaks like a real engine (``--engine``): its health, loading, model-list
and metrics answers, in that engine's own paths, names and formats. Pure: the answers are values
built from the node's config, its load and whether it is still loading.

=========== ========================================= =================================== ==========================
engine      health (while loading)                    models                              load figures
=========== ========================================= =================================== ==========================
``blyan``   ``/health`` JSON (``health_status``)      ``/v1/models``, ``/api/tags``       none
``vllm``    ``/health`` empty 200 (503)               ``/v1/models`` (``owned_by vllm``)  ``/metrics``: ``vllm:*``
``sglang``  ``/health``, ``/health_generate`` (503)   ``/v1/models``, ``/get_model_info`` ``/metrics``: ``sglang:*``
``llamacpp`` ``/health`` ``{"status":"ok"}`` (503     ``/v1/models`` (``llamacpp``)       ``/metrics``, ``/slots``
            "Loading model", on every path)
``ollama``  ``/``, ``/api/version``                   ``/api/tags`` (``/api/ps`` loaded)  ``/api/ps``
``tgi``     ``/health`` (503)                         ``/info`` (``model_id``)            ``/metrics``: ``tgi_*``
=========== ========================================= =================================== ==========================
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

BLYAN = "blyan"
VLLM = "vllm"
SGLANG = "sglang"
LLAMACPP = "llamacpp"
OLLAMA = "ollama"
TGI = "tgi"

#: The engines a devnode can speak like, its own Blyan-style default first.
ENGINES = (BLYAN, VLLM, SGLANG, LLAMACPP, OLLAMA, TGI)

#: ``owned_by`` of each engine's ``/v1/models`` (TGI names the model itself; see ``model_list``).
OWNERS = {BLYAN: "blyan-devnode", VLLM: "vllm", SGLANG: "sglang", LLAMACPP: "llamacpp", OLLAMA: "library"}

#: Versions reported by ``/version``, ``/api/version`` and ``/info``.
VERSIONS = {VLLM: "0.9.1", OLLAMA: "0.9.0", TGI: "3.3.4"}

#: The paths each engine serves besides OpenAI's chat completions and the devnode's own.
PATHS = {
    BLYAN: frozenset({"/health", "/v1/models", "/api/generate", "/api/tags"}),
    VLLM: frozenset({"/health", "/v1/models", "/version", "/metrics"}),
    SGLANG: frozenset({"/health", "/health_generate", "/v1/models", "/get_model_info", "/metrics"}),
    LLAMACPP: frozenset({"/health", "/v1/models", "/metrics", "/slots"}),
    OLLAMA: frozenset({"/", "/api/version", "/v1/models", "/api/generate", "/api/tags", "/api/ps"}),
    TGI: frozenset({"/health", "/v1/models", "/info", "/metrics"}),
}

#: How many requests a simulated node holds in its KV cache at once (for the usage figure).
KV_CAPACITY = 64


def is_engine(value: object) -> bool:
    """Whether ``value`` names an engine a devnode can speak like."""
    return value in ENGINES


@attrs.frozen
class Load:
    """What a node is doing now: requests generating, requests waiting, whether it still loads, and
    how many it runs at once (its KV-cache use is ``running / min(capacity, KV_CAPACITY)``)."""

    running: int = 0
    waiting: int = 0
    loading: bool = False
    capacity: int = KV_CAPACITY


def loading_answer(engine: str) -> tuple[int, object]:
    """Status and JSON body of a path answered while the model loads (llama.cpp's own error shape)."""
    if engine == LLAMACPP:
        return 503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    return 503, {"error": {"message": "the model is loading", "type": "unavailable_error", "code": 503}}


def answers_while_loading(engine: str, path: str) -> bool:
    """Whether ``path`` answers normally while the model loads (llama.cpp refuses every path; the
    others answer all but health and inference; Ollama loads models on demand, never at start)."""
    if engine == OLLAMA:
        return True
    if engine == LLAMACPP:
        return False
    return path not in ("/health", "/health_generate", "/v1/chat/completions", "/api/generate")


def model_list(engine: str, models: Sequence[str], created: int) -> dict:
    """The OpenAI ``GET /v1/models`` list as ``engine`` writes it."""
    data = []
    for model in models:
        entry: dict = {"id": model, "object": "model", "created": created,
                       "owned_by": OWNERS.get(engine, model)}
        if engine in (VLLM, SGLANG):
            entry.update(root=model, max_model_len=4096)
        data.append(entry)
    return {"object": "list", "data": data}


def info(models: Sequence[str]) -> dict:
    """TGI's ``GET /info``."""
    return {"model_id": models[0], "model_sha": None, "model_dtype": "torch.float16",
            "max_concurrent_requests": 128, "max_input_tokens": 4095, "max_total_tokens": 4096,
            "version": VERSIONS[TGI], "router": "text-generation-router"}


def model_info(models: Sequence[str]) -> dict:
    """SGLang's ``GET /get_model_info``."""
    return {"model_path": models[0], "tokenizer_path": models[0], "is_generation": True}


def running_models(models: Sequence[str], load: Load, expires_at: str) -> dict:
    """Ollama's ``GET /api/ps``: the models in memory (all of them once a request ran, none while idle)."""
    loaded = models if load.running else ()
    return {"models": [{"name": m, "model": m, "size": 0, "digest": "", "details": {}, "expires_at": expires_at,
                        "size_vram": 0} for m in loaded]}


def slots(load: Load, count: int = 4) -> list:
    """llama.cpp's ``GET /slots``: one entry per slot, the first ``running`` of them busy."""
    return [{"id": index, "is_processing": index < load.running, "n_ctx": 4096} for index in range(count)]


def _gauge(name: str, help_text: str, samples: Sequence[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [f"{name}{labels} {value:.1f}" if value == int(value) else f"{name}{labels} {value}"
              for labels, value in samples]
    return lines


def metrics(engine: str, models: Sequence[str], load: Load) -> str:
    """``GET /metrics`` in the Prometheus text format, with ``engine``'s own metric names and labels."""
    usage = min(1.0, load.running / min(load.capacity, KV_CAPACITY))
    lines: list[str] = []
    if engine == VLLM:
        labels = f'{{engine="0",model_name="{models[0]}"}}'
        lines += _gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                        [(labels, load.running)])
        lines += _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                        [(labels, load.waiting)])
        lines += _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", [(labels, usage)])
    elif engine == SGLANG:
        labels = f'{{model_name="{models[0]}"}}'
        lines += _gauge("sglang:num_running_reqs", "The number of running requests.", [(labels, load.running)])
        lines += _gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.",
                        [(labels, load.waiting)])
        lines += _gauge("sglang:token_usage", "The token usage.", [(labels, usage)])
    elif engine == LLAMACPP:
        lines += _gauge("llamacpp:requests_processing", "Number of requests processing.", [("", load.running)])
        lines += _gauge("llamacpp:requests_deferred", "Number of requests deferred.", [("", load.waiting)])
    elif engine == TGI:
        lines += _gauge("tgi_queue_size", "Current queue size", [("", load.waiting)])
        lines += _gauge("tgi_batch_current_size", "Current batch size", [("", load.running)])
    return "\n".join(lines) + "\n"
