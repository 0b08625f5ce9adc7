"""The ``twistd blyan-devnode`` plugin: run one simulated GPU node.

``twistd -n blyan-devnode --port tcp:8001:interface=127.0.0.1 --tps 20 --models a,b``
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from blyanproxy.devnode.config import SettingError, evolve_from_text
from blyanproxy.devnode.node import DevNode, DevNodeConfig

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorCore, IReactorTime

log = Logger()

_DEFAULTS = DevNodeConfig()

_SETTINGS = (
    # option, DevNodeConfig field, help
    ("name", "name", "Node name reported by /health."),
    ("models", "models", "Comma-separated names of the models served."),
    ("tps", "tokens_per_second", "Tokens per second of each generation (> 0)."),
    ("ttft-ms", "ttft_ms", "Milliseconds before the first token."),
    ("tokens", "max_tokens", "Completion length in tokens when a request sets no max_tokens."),
    ("fail-status", "fail_status", "Answer every inference request with this HTTP status (400-599)."),
    ("close-after", "close_after", "Abort streamed responses' connections after this many tokens."),
    ("health-status", "health_status", "HTTP status of /health (200-599)."),
    ("health-delay-ms", "health_delay_ms", "Milliseconds before /health answers."),
    ("engine", "engine", "Engine to speak like: blyan, vllm, sglang, llamacpp, ollama or tgi."),
    ("loading-ms", "loading_ms", "Milliseconds after start during which the model is still loading."),
    ("max-num-seqs", "max_num_seqs", "Generations run at once; more wait in a queue."),
    ("prompt-token-ms", "prompt_token_ms", "Milliseconds of first-token time per prompt token not cached."),
    ("prefix-cache-blocks", "prefix_cache_blocks", "Prompt blocks (16 words each) the prefix cache holds."),
)


def _default_text(field: str) -> str | None:
    """A config default as its option text (None for an unset failure knob)."""
    value = getattr(_DEFAULTS, field)
    if value is None:
        return None
    return ",".join(value) if isinstance(value, tuple) else str(value)


class Options(usage.Options):
    """Command line of ``twistd blyan-devnode``; after parsing, ``self["config"]`` is the DevNodeConfig."""

    optParameters = [
        ["port", "p", "tcp:8001:interface=127.0.0.1", "Where to listen (a strports description)."],
    ] + [[option, None, _default_text(field), help] for option, field, help in _SETTINGS]
    optFlags = [["hang", None, "Accept inference requests and never answer them."]]

    def postOptions(self) -> None:
        """Build the config and check the port description; UsageError names a bad option and value."""
        settings = [
            (f"--{option}", field, self[option]) for option, field, _ in _SETTINGS if self[option] is not None
        ]
        if self["hang"]:
            settings.append(("--hang", "hang", "true"))
        try:
            self["config"] = evolve_from_text(_DEFAULTS, settings)
        except SettingError as error:
            raise usage.UsageError(str(error)) from None
        try:
            # Parse only: the endpoint is thrown away, so it needs no reactor, and none is
            # imported (twistd may not have installed the one it was asked for yet).
            serverFromString(None, self["port"])
        except (ValueError, TypeError) as error:
            raise usage.UsageError(f"--port: bad value {self['port']!r}: {error}") from None


def makeService(options: Options, reactor: IReactorCore | None = None) -> MultiService:
    """The node's service: its Site listening on ``options["port"]``.

    ``reactor`` (also the node's clock, an ``IReactorTime``) defaults to the global one."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options["config"]
    node = DevNode(config, cast("IReactorTime", reactor))
    top = MultiService()
    listener = strports.service(options["port"], node.site(), reactor=reactor)
    listener.setName("devnode-http")
    listener.setServiceParent(top)
    log.info(
        "devnode {name} serving {models} on {port} at {tps} tokens/s",
        name=config.name,
        models=",".join(config.models),
        port=options["port"],
        tps=config.tokens_per_second,
    )
    return top
