"""Settings: one frozen value built from defaults, environment variables and options.

Priority rises from built-in defaults to environment variables to command-line
options. Every setting is parsed and checked once; a bad value raises
``ConfigError`` naming the variable or option and the value (secrets are never
echoed). An empty environment variable counts as unset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Callable

import attrs

from blyanproxy.core import (
    AffinitySource,
    ForwardTrust,
    parse_affinity_source,
    parse_base_url,
    parse_forward_trust,
    selection,
)
from blyanproxy.discovery import NodeAllowList, parse_node_allow
from blyanproxy.logs import LOG_LEVELS
from blyanproxy.store import EtcdLocation, parse_state_store

POLICIES = tuple(selection.POLICIES)
DEFAULT_LISTEN = "tcp:9000:interface=127.0.0.1"
_NODE_VARIABLE = re.compile(r"NODE_(\d+)\Z")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f|]")


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


@attrs.frozen
class NodeSpec:
    """A node named in the environment (``NODE_<n>``) or with ``--node``."""

    name: str
    base_url: str
    source: str
    tags: tuple = ()
    weight: int = 1
    tls_verify: bool = True


@attrs.frozen
class Settings:
    """Every setting of one proxy process, validated. Durations are in seconds."""

    listen: str = DEFAULT_LISTEN
    admin_token: str | None = attrs.field(default=None, repr=False)
    admin_token_file: str | None = None
    selection_policy: str = "active-first"
    health_interval: float = 5.0
    health_timeout: float = 3.0
    health_paths: tuple = ("/health",)
    health_statuses: frozenset = frozenset(range(200, 300))
    health_rise: int = 2
    health_fall: int = 3
    eject_after: int = 3
    eject_cooldown: float = 10.0
    eject_cooldown_max: float = 300.0
    state_file: str = "./data/proxy_state.json"
    state_store: EtcdLocation | None = None  # None: the JSON state file
    etcd_timeout: float = 2.0
    workers: int = 1
    worker_stop_timeout: float = 30.0
    nodes: tuple = ()
    connect_timeout: float = 5.0
    proxy_timeout: float = 600.0
    idle_timeout: float = 300.0
    header_timeout: float = 30.0
    sse_keepalive: float = 15.0
    max_attempts: int = 3
    retry_delay: float = 0.0
    retry_on_status: frozenset = frozenset({502, 503, 504})
    max_body_bytes: int = 32 * 1024 * 1024
    pool_max_idle: int = 128
    pool_idle_timeout: float = 4.0
    tls_ca_file: str | None = None
    trust_forwarded: ForwardTrust = ForwardTrust()
    strip_origin: bool = False
    affinity_key: AffinitySource | None = None
    affinity_load_factor: float = 1.25
    ws_heartbeat: float = 30.0
    enable_metrics: bool = True
    metrics_token: str | None = attrs.field(default=None, repr=False)
    api_url: str | None = None
    workloads_timeout: float = 10.0
    workloads_node_scheme: str = "https"
    workloads_node_port: int = 0
    workloads_node_allow: NodeAllowList = NodeAllowList()
    workloads_policy: str = "least-inflight"
    workloads_refresh: float = 60.0
    workloads_idle: float = 180.0
    workloads_negative_ttl: float = 5.0
    workloads_rejected_ttl: float = 30.0
    workloads_stale_max: float = 300.0
    workloads_max_keys: int = 10000
    workloads_max_calls: int = 8
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = True
    drain_grace: float = 30.0
    env_file: str | None = None
    demo: int = 0


# --- value parsers: text -> value, raising ValueError with the reason -------


#: The longest duration a setting takes (about 31 years): longer ones are typing mistakes.
MAX_MILLISECONDS = 10**12


def _milliseconds(minimum: float = 0.0) -> Callable[[str], float]:
    def parse(text: str) -> float:
        if not re.fullmatch(r"\d+(\.\d+)?", text.strip()):
            raise ValueError("expected a number of milliseconds")
        value = float(text) / 1000.0
        if value < minimum:
            raise ValueError(f"must be at least {minimum * 1000:g} ms")
        if not value * 1000.0 <= MAX_MILLISECONDS:
            raise ValueError(f"must be at most {MAX_MILLISECONDS} ms")
        return value

    return parse


def _whole(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"\d+", text.strip()):
            raise ValueError("expected a whole number")
        value = int(text)
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}")
        return value

    return parse


def _factor(text: str) -> float:
    if not re.fullmatch(r"\d+(\.\d+)?", text.strip()) or float(text) < 1.0:
        raise ValueError("expected a number of at least 1")
    return float(text)


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return text

    return parse


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError("expected DEBUG, INFO, WARN or ERROR")
    return text.upper()


def _paths(text: str) -> tuple:
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    if not paths:
        raise ValueError("expected at least one path")
    for path in paths:
        if not path.startswith("/") or _NAME_FORBIDDEN.search(path) or " " in path:
            raise ValueError(f"{path!r} is not an absolute path")
    return paths


def _status_ranges(text: str) -> frozenset:
    statuses = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError("expected statuses or ranges such as 200-299,304")
        first, last = int(low), int(high) if sep else int(low)
        if not 100 <= first <= last <= 599:
            raise ValueError("statuses must lie between 100 and 599")
        statuses.update(range(first, last + 1))
    return frozenset(statuses)


def _statuses(text: str) -> frozenset:
    if text.strip().lower() == "none":
        return frozenset()
    statuses = set()
    for part in text.split(","):
        if not re.fullmatch(r"5\d\d", part.strip()):
            raise ValueError("expected 5xx status codes separated by commas, or none")
        statuses.add(int(part))
    return frozenset(statuses)


def _api_url(text: str) -> str:
    return parse_base_url(text).text


def _secret(text: str) -> str:
    if len(text) < 16:
        raise ValueError("must be at least 16 characters")
    if _NAME_FORBIDDEN.search(text) or " " in text:
        raise ValueError("must not contain spaces, '|' or control characters")
    return text


def _text(text: str) -> str:
    return text


def _listen(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9]+:\S+", text):
        raise ValueError("expected a strports description such as tcp:9000:interface=127.0.0.1")
    return text


def parse_node(text: str, source: str) -> NodeSpec:
    """Parse ``name|url[|key=value...]`` (keys: ``weight``, ``tags``, ``tls_verify``)."""
    fields = text.split("|")
    if len(fields) < 2:
        raise ValueError("expected name|url")
    name, url = fields[0].strip(), fields[1].strip()
    if not name or len(name) > 128 or _NAME_FORBIDDEN.search(name) or not name.isprintable():
        raise ValueError("the name must be 1 to 128 printable characters")
    try:
        base = parse_base_url(url)
    except ValueError as exc:
        raise ValueError(f"the URL {exc}") from None
    extras: dict = {}
    for item in fields[2:]:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"expected key=value after the URL, got {item!r}")
        if key == "weight":
            extras["weight"] = _whole(1, 1000)(value)
        elif key == "tags":
            tags = tuple(t.strip() for t in value.split(",") if t.strip())
            for tag in tags:
                if not _TAG.match(tag):
                    raise ValueError(f"tag {tag!r} must be letters, digits, '.', '_', ':' or '-'")
            extras["tags"] = tags
        elif key == "tls_verify":
            extras["tls_verify"] = _boolean(value)
        else:
            raise ValueError(f"unknown key {key!r} (known: weight, tags, tls_verify)")
    return NodeSpec(name=name, base_url=base.text, source=source, **extras)


@attrs.frozen
class Setting:
    """One setting: its field, environment variable, option, default text, parser and meaning."""

    field: str
    env: str | None
    option: str | None
    default: str
    parse: Callable[[str], object]
    meaning: str
    secret: bool = False


SETTINGS = (
    Setting("admin_token", "ADMIN_TOKEN", None, "(generated)", _secret,
            "admin API token (at least 16 characters; env only, never on the command line)",
            secret=True),
    Setting("admin_token_file", "ADMIN_TOKEN_FILE", "admin-token-file", "(beside the state file)",
            _text, "file holding the admin token"),
    Setting("selection_policy", "SELECTION_POLICY", "policy", "active-first", _choice(POLICIES),
            "node selection policy: " + ", ".join(POLICIES)),
    Setting("health_interval", "HEALTH_INTERVAL_MS", "health-interval-ms", "5000",
            _milliseconds(0.1), "milliseconds between active health check runs"),
    Setting("health_timeout", "HEALTH_TIMEOUT_MS", "health-timeout-ms", "3000",
            _milliseconds(0.01), "timeout of one health probe, in milliseconds"),
    Setting("health_paths", "HEALTH_PATHS", "health-paths", "/health", _paths,
            "comma-separated paths probed in order; the first 2xx wins"),
    Setting("health_statuses", "HEALTH_STATUSES", "health-statuses", "200-299", _status_ranges,
            "probe statuses that count as healthy (statuses and ranges, comma-separated)"),
    Setting("health_rise", "HEALTH_RISE", "health-rise", "2", _whole(1, 100),
            "passing probes in a row that bring a down node up"),
    Setting("health_fall", "HEALTH_FALL", "health-fall", "3", _whole(1, 100),
            "failing probes in a row that take an up node down"),
    Setting("eject_after", "EJECT_AFTER", "eject-after", "3", _whole(1, 100),
            "failed requests in a row that eject a node (a refused connection ejects at once)"),
    Setting("eject_cooldown", "EJECT_COOLDOWN_MS", "eject-cooldown-ms", "10000", _milliseconds(0.01),
            "how long a first ejection lasts; it doubles with each ejection in a row"),
    Setting("eject_cooldown_max", "EJECT_COOLDOWN_MAX_MS", "eject-cooldown-max-ms", "300000",
            _milliseconds(0.01), "the longest an ejection lasts"),
    Setting("state_file", "STATE_FILE", "state-file", "./data/proxy_state.json", _text,
            "JSON file holding nodes, active node and policy across restarts"),
    Setting("state_store", "STATE_STORE", "state-store", "file", parse_state_store,
            "where the fleet is kept: file (STATE_FILE, one process) or etcd://host:port/prefix (shared)"),
    Setting("etcd_timeout", "ETCD_TIMEOUT_MS", "etcd-timeout-ms", "2000", _milliseconds(0.01),
            "timeout of every etcd call, in milliseconds (an admin write past it gets 503)"),
    Setting("workers", "WORKERS", "workers", "1", _whole(1, 64),
            "proxy processes accepting on the listening port (above 1 needs STATE_STORE=etcd://...)"),
    Setting("worker_stop_timeout", "WORKER_STOP_TIMEOUT_MS", "worker-stop-timeout-ms", "30000",
            _milliseconds(0.01), "how long stopping waits for workers to drain before killing them"),
    Setting("connect_timeout", "CONNECT_TIMEOUT_MS", "connect-timeout-ms", "5000",
            _milliseconds(0.01), "timeout for connecting to a node, in milliseconds"),
    Setting("proxy_timeout", "PROXY_TIMEOUT", "proxy-timeout", "600000", _milliseconds(0.01),
            "milliseconds to wait for a node's response headers"),
    Setting("idle_timeout", "IDLE_TIMEOUT_MS", "idle-timeout-ms", "300000", _milliseconds(0.01),
            "milliseconds a response body may stay silent before it is cut"),
    Setting("header_timeout", "HEADER_TIMEOUT_MS", "header-timeout-ms", "30000", _milliseconds(0.01),
            "milliseconds a client has to send a whole request head (408 after)"),
    Setting("sse_keepalive", "SSE_KEEPALIVE_MS", "sse-keepalive-ms", "15000", _milliseconds(),
            "idle milliseconds before an SSE comment keeps a stream alive (0: off)"),
    Setting("max_attempts", "MAX_ATTEMPTS", "max-attempts", "3", _whole(1, 20),
            "nodes tried per request before giving up (MAX_RETRIES=n means n+1)"),
    Setting("retry_delay", "RETRY_DELAY_MS", "retry-delay-ms", "0", _milliseconds(),
            "milliseconds to wait before failing over to the next node"),
    Setting("retry_on_status", "RETRY_ON_STATUS", "retry-on-status", "502,503,504", _statuses,
            "node statuses that fail over to another node (none: never)"),
    Setting("max_body_bytes", "MAX_BODY_BYTES", "max-body-bytes", str(32 * 1024 * 1024),
            _whole(0, 2**40), "largest request body accepted, in bytes (413 above)"),
    Setting("pool_max_idle", "POOL_MAX_IDLE", "pool-max-idle", "128", _whole(0, 10000),
            "idle keep-alive connections kept per node"),
    Setting("pool_idle_timeout", "POOL_IDLE_TIMEOUT_MS", "pool-idle-timeout-ms", "4000",
            _milliseconds(0.01), "milliseconds an idle upstream connection is kept"),
    Setting("tls_ca_file", "TLS_CA_FILE", "tls-ca-file", "(system roots)", _text,
            "PEM bundle of CA certificates trusted for https nodes"),
    Setting("trust_forwarded", "TRUST_FORWARDED", "trust-forwarded", "false", parse_forward_trust,
            "keep incoming X-Forwarded-* headers from these peers: true, false, or addresses/CIDRs"),
    Setting("affinity_key", "AFFINITY_KEY", "affinity-key", "(off)", parse_affinity_source,
            "keep requests sharing this key on one node: header:NAME, cookie:NAME or query:NAME"),
    Setting("affinity_load_factor", "AFFINITY_LOAD_FACTOR", "affinity-load-factor", "1.25", _factor,
            "a node above this multiple of the average in-flight count takes no new affinity keys"),
    Setting("strip_origin", "STRIP_ORIGIN", "strip-origin", "false", _boolean,
            "drop the client's Origin header before forwarding"),
    Setting("ws_heartbeat", "WS_HEARTBEAT_MS", "ws-heartbeat-ms", "30000", _milliseconds(),
            "idle milliseconds before TCP keep-alive probes check a WebSocket's peers (0: off)"),
    Setting("enable_metrics", "ENABLE_METRICS", "enable-metrics", "true", _boolean,
            "serve Prometheus metrics at /metrics"),
    Setting("metrics_token", "METRICS_TOKEN", None, "(none)", _secret,
            "token a scraper must send (X-Admin-Token or Bearer) to read /metrics; unset: open",
            secret=True),
    Setting("api_url", "API_URL", "api-url", "(off)", _api_url,
            "workloads API for per-API-key node discovery, e.g. https://api.comput3.ai/api/v0"),
    Setting("workloads_timeout", "WORKLOADS_TIMEOUT_MS", "workloads-timeout-ms", "10000", _milliseconds(0.01),
            "time a workloads API call may take, connecting and reading included"),
    Setting("workloads_node_scheme", "WORKLOADS_NODE_SCHEME", "workloads-node-scheme", "https",
            _choice(("https", "http")), "scheme of a discovered node's URL ({scheme}://{node})"),
    Setting("workloads_node_port", "WORKLOADS_NODE_PORT", "workloads-node-port", "0", _whole(0, 65535),
            "port of a discovered node whose name has none; 0: the scheme's default"),
    Setting("workloads_node_allow", "WORKLOADS_NODE_ALLOW", "workloads-node-allow", "(any but loopback and link-local)",
            parse_node_allow, "host suffixes and CIDRs a discovered node must match, comma-separated"),
    Setting("workloads_policy", "WORKLOADS_POLICY", "workloads-policy", "least-inflight", _choice(POLICIES),
            "selection policy among an API key's workloads"),
    Setting("workloads_refresh", "WORKLOADS_REFRESH_MS", "workloads-refresh-ms", "60000", _milliseconds(1.0),
            "how often the workloads of a key in use are fetched again"),
    Setting("workloads_idle", "WORKLOADS_IDLE_MS", "workloads-idle-ms", "180000", _milliseconds(1.0),
            "a key unused this long, with nothing in flight, is forgotten"),
    Setting("workloads_negative_ttl", "WORKLOADS_NEGATIVE_TTL_MS", "workloads-negative-ttl-ms", "5000",
            _milliseconds(), "an answer with no running workload, or a failed call with nothing cached, "
            "is reused this long"),
    Setting("workloads_rejected_ttl", "WORKLOADS_REJECTED_TTL_MS", "workloads-rejected-ttl-ms", "30000",
            _milliseconds(), "a key the workloads API refused is refused this long without asking again"),
    Setting("workloads_stale_max", "WORKLOADS_STALE_MAX_MS", "workloads-stale-max-ms", "300000",
            _milliseconds(), "while the workloads API fails, a cached list this old is still used"),
    Setting("workloads_max_keys", "WORKLOADS_MAX_KEYS", "workloads-max-keys", "10000", _whole(1, 1000000),
            "most API keys cached at once (the least recently used is forgotten)"),
    Setting("workloads_max_calls", "WORKLOADS_MAX_CALLS", "workloads-max-calls", "8", _whole(1, 1000),
            "most workloads API calls in progress at once"),
    Setting("log_level", "LOG_LEVEL", "log-level", "INFO", _log_level,
            "DEBUG, INFO, WARN or ERROR"),
    Setting("log_format", "LOG_FORMAT", "log-format", "text", _choice(("text", "json")),
            "text: blyanproxy's events in twistd's log; json: JSON lines on standard output"),
    Setting("access_log", "ACCESS_LOG", "access-log", "true", _boolean,
            "write one access line per finished request"),
    Setting("drain_grace", "DRAIN_GRACE_MS", "drain-grace-ms", "30000", _milliseconds(),
            "on SIGTERM, milliseconds open requests and streams may take to finish before they are cut"),
    Setting("env_file", "ENV_FILE", "env-file", "(none)", _text,
            "file of NAME=value settings read at start and again on SIGHUP (overrides the environment)"),
    Setting("demo", None, "demo", "0", _whole(0, 64),
            "start this many simulated nodes in-process and register them"),
)

LISTEN_OPTION = Setting("listen", "LISTEN", "port", DEFAULT_LISTEN, _listen,
                        "listening endpoint (strports); PROXY_PORT sets only its port")


def _read(setting: Setting, env: Mapping[str, str], options: Mapping[str, object]):
    """Return (source name, raw text) for a setting, or None when it is unset."""
    if setting.option is not None and options.get(setting.option) is not None:
        return "--" + setting.option, str(options[setting.option])
    if setting.env is not None and env.get(setting.env, "") != "":
        return setting.env, env[setting.env]
    return None


def _parse(parse: Callable[[str], object], source: str, raw: str, secret: bool = False):
    try:
        return parse(raw)
    except ValueError as exc:
        shown = "" if secret else f" (got {raw!r})"
        raise ConfigError(f"{source}: {exc}{shown}") from None


def _listen_value(env: Mapping[str, str], options: Mapping[str, object]) -> str:
    found = _read(LISTEN_OPTION, env, options)
    if found is not None:
        if found[0] == "LISTEN" and env.get("PROXY_PORT"):
            raise ConfigError("LISTEN and PROXY_PORT are both set: set one")
        return _parse(LISTEN_OPTION.parse, *found)
    if env.get("PROXY_PORT"):
        port = _parse(_whole(0, 65535), "PROXY_PORT", env["PROXY_PORT"])
        return f"tcp:{port}:interface=127.0.0.1"
    return DEFAULT_LISTEN


def _max_attempts(env: Mapping[str, str], options: Mapping[str, object], values: dict) -> None:
    if env.get("MAX_RETRIES"):
        if _read(SETTINGS_BY_FIELD["max_attempts"], env, options) is not None:
            raise ConfigError("MAX_RETRIES and MAX_ATTEMPTS/--max-attempts are both set: set one")
        retries = _parse(_whole(0, 19), "MAX_RETRIES", env["MAX_RETRIES"])
        values["max_attempts"] = retries + 1


def _nodes(env: Mapping[str, str], option_nodes: Sequence[str]) -> tuple:
    found = []
    for name, value in env.items():
        match = _NODE_VARIABLE.match(name)
        if match and value != "":
            found.append((int(match.group(1)), name, value))
    sources = [(name, value) for _, name, value in sorted(found)]
    sources += [("--node", value) for value in option_nodes]
    specs = [
        _parse(lambda text, source=source: parse_node(text, source), source, value)
        for source, value in sources
    ]
    seen: dict = {}
    for spec in specs:
        if spec.base_url in seen:
            raise ConfigError(
                f"{spec.source}: base URL {spec.base_url} is already used by {seen[spec.base_url]}"
            )
        seen[spec.base_url] = spec.source
    return tuple(specs)


SETTINGS_BY_FIELD = {s.field: s for s in SETTINGS}


def settings_from(
    env: Mapping[str, str],
    options: Mapping[str, object],
    option_nodes: Sequence[str] = (),
) -> Settings:
    """Build the ``Settings`` from the environment and parsed options (``None`` = not given)."""
    values: dict = {}
    sources: dict = {}
    for setting in SETTINGS:
        found = _read(setting, env, options)
        if found is not None:
            sources[setting.field] = found[0]
            values[setting.field] = _parse(setting.parse, *found, secret=setting.secret)
    _max_attempts(env, options, values)
    values["listen"] = _listen_value(env, options)
    values["nodes"] = _nodes(env, option_nodes)
    return _check_workers(Settings(**values), sources.get("workers", "WORKERS"))


def _check_workers(settings: Settings, source: str) -> Settings:
    """Several workers need a shared store and a listening socket they can all accept on.

    ``source`` is where the worker count came from (``WORKERS`` or ``--workers``),
    so the error names what the operator typed.
    """
    if settings.workers == 1:
        return settings
    if settings.demo:
        raise ConfigError(f"{source}: --demo runs in one process; use 1 worker")
    if settings.state_store is None:
        raise ConfigError(
            f"{source}: {settings.workers} workers need STATE_STORE=etcd://host:port/prefix: "
            "the state file is written by one process only"
        )
    if not settings.listen.startswith(("tcp:", "tcp6:", "unix:")):
        raise ConfigError(f"{source}: the listening endpoint must be tcp:, tcp6: or unix: (terminate TLS in front)")
    return settings
