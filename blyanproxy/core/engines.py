"""Inference engines as the proxy knows them: kinds, where each is probed, and how answers read.

A node's ``engine`` is declared (``NODE_n=…|engine=vllm``, admin ``engine``) or
``auto``: then ``detect`` names it from a few cheap probes (``DETECTION_PATHS``
in order, stopping at the first decisive answer). The engine decides:

- the health probe (``health_paths``, tried in order; a 404 means "not here,
  try the next"), and what a 503 means (``probe_verdict``: loading or failing);
- where the served models come from (``models_path``, read by ``models_from``);
- whether a leading ``/api`` is removed before forwarding (``strips_api``:
  every kind but Ollama, whose native API lives under ``/api``).

Facts from the engines' own sources: vLLM and SGLang answer ``/health`` and
``/v1/models`` (``owned_by`` ``vllm``, ``sglang``); llama.cpp's server
answers ``/health`` (503 "Loading model" while loading) and ``/v1/models``
(``owned_by`` ``llamacpp``); llama-cpp-python has no ``/health`` and says
``owned_by`` ``me``; Ollama answers ``/api/version`` and ``/api/tags`` (its
``/v1/models`` says ``owned_by`` ``library``); TGI answers ``/health`` and
``/info`` (``model_id``). Pure, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import attrs

from blyanproxy.core.errors import ProxyError

AUTO = "auto"
VLLM = "vllm"
SGLANG = "sglang"
LLAMACPP = "llamacpp"
OLLAMA = "ollama"
TGI = "tgi"
OPENAI = "openai"
BLYAN = "blyan"

#: Every kind a node may declare, ``auto`` (detect it) first.
ENGINES = (AUTO, VLLM, SGLANG, LLAMACPP, OLLAMA, TGI, OPENAI, BLYAN)

#: ``owned_by`` values of ``/v1/models`` that name the server itself.
_OWNERS = {"vllm": VLLM, "sglang": SGLANG, "llamacpp": LLAMACPP, "me": LLAMACPP, "library": OLLAMA,
           "blyan-devnode": BLYAN}

#: The probes of a detection, in order.
DETECTION_PATHS = ("/v1/models", "/api/version", "/info", "/health")


@attrs.frozen
class Answer:
    """What a node answered one probe: its status and (capped) body."""

    status: int
    body: bytes = b""


@attrs.frozen
class Profile:
    """How one kind of engine is probed (see the module docstring)."""

    health_paths: tuple[str, ...]
    models_path: str | None
    strips_api: bool = True
    #: A 503 from a node not yet up means it is still loading its model.
    loads: bool = False
    #: Paths not asked while the node has requests in flight: asking them interrupts its work.
    #: llama-cpp-python's ``/v1/models`` waits for its model lock, and a stream running when
    #: another request waits is ended with ``[DONE]`` (its ``interrupt_requests``, on by default).
    busy_paths: frozenset[str] = frozenset()


PROFILES: Mapping[str, Profile] = {
    VLLM: Profile(("/health",), "/v1/models", loads=True),
    SGLANG: Profile(("/health",), "/v1/models", loads=True),
    LLAMACPP: Profile(("/health", "/v1/models"), "/v1/models", loads=True, busy_paths=frozenset({"/v1/models"})),
    OLLAMA: Profile(("/api/version", "/"), "/api/tags", strips_api=False),
    TGI: Profile(("/health",), "/info", loads=True),
    OPENAI: Profile(("/health", "/v1/models"), "/v1/models", busy_paths=frozenset({"/v1/models"})),
    BLYAN: Profile(("/health",), "/v1/models"),
    AUTO: Profile(("/health", "/v1/models"), "/v1/models", busy_paths=frozenset({"/v1/models"})),
}


def profile(engine: str | None) -> Profile:
    """The profile of ``engine`` (``None``, not detected yet, probes as ``auto``)."""
    return PROFILES.get(engine or AUTO, PROFILES[AUTO])


PASSED = "passed"
LOADING = "loading"
#: The probe was not made: the node is busy with requests and asking would interrupt them.
BUSY = "busy"
NOT_HERE = "not_here"
FAILED = "failed"


def probe_verdict(engine: str | None, answer: Answer, accepted: frozenset[int], was_up: bool) -> str:
    """What one health probe's answer says: ``PASSED``, ``LOADING``, ``NOT_HERE`` (404) or ``FAILED``.

    A 503 is loading when its body says so (llama.cpp's "Loading model"), or
    when it comes from an engine that answers 503 while starting and the node
    was not up; from a node that was up it is a failure.
    """
    if answer.status in accepted:
        return PASSED
    if answer.status == 404:
        return NOT_HERE
    if answer.status == 503 and not was_up and (profile(engine).loads or b"loading" in answer.body[:512].lower()):
        return LOADING
    return FAILED


def _json(answer: Answer | None) -> object:
    """The JSON document of a 200 answer, or ``None``."""
    if answer is None or answer.status != 200:
        return None
    try:
        return json.loads(answer.body)
    except (ValueError, RecursionError):
        return None


def _model_list(document: object, items_key: str, name_key: str) -> tuple[str, ...] | None:
    """The names ``document[items_key][*][name_key]`` (text only, each once), or ``None``."""
    if not isinstance(document, dict) or not isinstance(document.get(items_key), list):
        return None
    names: list[str] = []
    for item in document[items_key]:
        name = item.get(name_key) if isinstance(item, dict) else None
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return tuple(names)


def models_from(path: str, answer: Answer | None) -> tuple[str, ...] | None:
    """The models an answer of ``path`` lists (``/v1/models``, ``/api/tags``, ``/info``), or ``None``."""
    document = _json(answer)
    if path == "/api/tags":
        return _model_list(document, "models", "name")
    if path == "/info":
        model_id = document.get("model_id") if isinstance(document, dict) else None
        return (model_id,) if isinstance(model_id, str) and model_id else None
    return _model_list(document, "data", "id")


def detect(answers: Sequence[tuple[str, Answer | None]]) -> tuple[bool, str | None]:
    """``(done, engine)`` after the answers of ``DETECTION_PATHS`` so far, in order (``None``: no answer).

    Done as soon as an answer is decisive; after all of them, ``openai`` for a
    node with a model list, ``blyan`` for one whose ``/health`` passed, else
    ``None`` (not detected: try again on the next health run).
    """
    seen = dict(answers)
    listing = _json(seen.get("/v1/models"))
    if isinstance(listing, dict) and isinstance(listing.get("data"), list):
        owners = {item.get("owned_by") for item in listing["data"] if isinstance(item, dict)}
        for owner in sorted(o for o in owners if isinstance(o, str)):
            if owner in _OWNERS:
                return True, _OWNERS[owner]
    version = _json(seen.get("/api/version"))
    if isinstance(version, dict) and isinstance(version.get("version"), str):
        return True, OLLAMA
    if models_from("/info", seen.get("/info")) is not None:
        return True, TGI
    if len(seen) < len(DETECTION_PATHS):
        return False, None
    if models_from("/v1/models", seen.get("/v1/models")) is not None:
        return True, OPENAI
    health = seen.get("/health")
    if health is not None and 200 <= health.status < 300:
        return True, BLYAN
    return True, None


T = TypeVar("T")


def serving(entries: Sequence[T], model: str, served: Callable[[T], tuple[str, ...] | None]) -> list[T]:
    """The entries that may take a request for ``model``: those known to serve it, else those whose
    models are not known yet (``served`` gives ``None``); never one known not to serve it."""
    known: list[T] = []
    unknown: list[T] = []
    for entry in entries:
        models = served(entry)
        if models is None:
            unknown.append(entry)
        elif model in models:
            known.append(entry)
    return known or unknown


def model_not_found(model: str) -> ProxyError:
    """The 404 for a model no node serves (its name in the message, shortened past 200 characters)."""
    shown = model if len(model) <= 200 else model[:200] + "…"
    return ProxyError(404, "model_not_found", f"The model '{shown}' does not exist: no node serves it")


def served_models(declared: tuple[str, ...], learned: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The models a node serves: those declared, else those learned, else ``None`` (not known)."""
    return declared if declared else learned


def engine_of(declared: str, detected: str | None) -> str | None:
    """The engine a node runs: the declared kind, else the one detected (``None``: not known yet)."""
    return declared if declared != AUTO else detected


def strips_api(engine: str | None) -> bool:
    """Whether a leading ``/api`` is removed before forwarding to a node running ``engine``."""
    return profile(engine).strips_api
