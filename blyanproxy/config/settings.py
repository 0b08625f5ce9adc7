"""The ``Settings`` value and the ``SETTINGS`` table: every setting's variable, option, default and parser."""

from __future__ import annotations

from typing import Callable

import attrs

from blyanproxy.config.parsers import (
    any_text,
    base_url_text,
    factor,
    header_name,
    health_paths,
    log_level_name,
    milliseconds,
    one_of,
    retry_statuses,
    status_ranges,
    strports,
    token,
    whole_number,
)
from blyanproxy.core import (
    AffinitySource,
    ForwardTrust,
    parse_affinity_source,
    parse_boolean,
    parse_forward_trust,
    selection,
)
from blyanproxy.discovery import NodeAllowList, parse_node_allow
from blyanproxy.store import EtcdLocation, parse_state_store

POLICIES = tuple(selection.POLICIES)
DEFAULT_LISTEN = "tcp:9000:interface=127.0.0.1"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


@attrs.frozen
class Settings:
    """Every setting of one proxy process, validated. Durations are in seconds."""

    listen: str = DEFAULT_LISTEN
    admin_token: str | None = attrs.field(default=None, repr=False)
    admin_token_file: str | None = None
    selection_policy: str = "active-first"
    health_interval: float = 5.0
    health_timeout: float = 3.0
    load_interval: float = 1.0
    health_paths: tuple = ()  # (): each engine's own probe
    health_statuses: frozenset = frozenset(range(200, 300))
    health_rise: int = 2
    health_fall: int = 3
    eject_after: int = 3
    eject_cooldown: float = 10.0
    eject_cooldown_max: float = 300.0
    state_file: str = "./data/proxy_state.json"
    state_store: EtcdLocation | None = None  # None: the JSON state file
    etcd_timeout: float = 2.0
    etcd_user: str | None = None
    etcd_password_file: str | None = None
    etcd_ca_file: str | None = None
    workers: int = 1
    worker_stop_timeout: float = 30.0
    nodes: tuple = ()
    connect_timeout: float = 5.0
    proxy_timeout: float = 600.0
    idle_timeout: float = 300.0
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    sse_keepalive: float = 15.0
    max_attempts: int = 3
    retry_delay: float = 0.0
    retry_on_status: frozenset = frozenset({502, 503, 504})
    max_body_bytes: int = 32 * 1024 * 1024
    max_buffered_bytes: int = 256 * 1024 * 1024
    max_connections_per_client: int = 256
    listen_backlog: int = 4096
    pool_max_idle: int = 128
    pool_idle_timeout: float = 4.0
    tls_ca_file: str | None = None
    trust_forwarded: ForwardTrust = ForwardTrust()
    strip_origin: bool = False
    affinity_key: AffinitySource | None = None
    affinity_load_factor: float = 1.25
    node_max_inflight: int = 0  # 0: no cap
    queue_max: int = 100
    queue_timeout: float = 30.0
    rate_limit_rpm: int = 0  # 0: no limit
    rate_limit_tpm: int = 0
    rate_limit_file: str | None = None
    caller_key_header: str | None = None
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
    workloads_lookups_per_client: int = 4
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = True
    drain_grace: float = 30.0
    env_file: str | None = None
    demo: int = 0


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
    Setting("admin_token", "ADMIN_TOKEN", None, "(generated)", token,
            "admin API token (at least 16 characters; env only, never on the command line)",
            secret=True),
    Setting("admin_token_file", "ADMIN_TOKEN_FILE", "admin-token-file", "(beside the state file)",
            any_text, "file holding the admin token"),
    Setting("selection_policy", "SELECTION_POLICY", "policy", "active-first", one_of(POLICIES),
            "node selection policy: " + ", ".join(POLICIES)),
    Setting("health_interval", "HEALTH_INTERVAL_MS", "health-interval-ms", "5000",
            milliseconds(0.1), "milliseconds between active health check runs"),
    Setting("health_timeout", "HEALTH_TIMEOUT_MS", "health-timeout-ms", "3000",
            milliseconds(0.01), "timeout of one health probe, in milliseconds"),
    Setting("load_interval", "LOAD_INTERVAL_MS", "load-interval-ms", "1000",
            milliseconds(0.1), "milliseconds between reads of the engines' load figures"),
    Setting("health_paths", "HEALTH_PATHS", "health-paths", "auto", health_paths,
            "comma-separated paths probed in order, the first 2xx wins; auto: each engine's own probe"),
    Setting("health_statuses", "HEALTH_STATUSES", "health-statuses", "200-299", status_ranges,
            "probe statuses that count as healthy (statuses and ranges, comma-separated)"),
    Setting("health_rise", "HEALTH_RISE", "health-rise", "2", whole_number(1, 100),
            "passing probes in a row that bring a down node up"),
    Setting("health_fall", "HEALTH_FALL", "health-fall", "3", whole_number(1, 100),
            "failing probes in a row that take an up node down"),
    Setting("eject_after", "EJECT_AFTER", "eject-after", "3", whole_number(1, 100),
            "failed requests in a row that eject a node (a refused connection ejects at once)"),
    Setting("eject_cooldown", "EJECT_COOLDOWN_MS", "eject-cooldown-ms", "10000", milliseconds(0.01),
            "how long a first ejection lasts; it doubles with each ejection in a row"),
    Setting("eject_cooldown_max", "EJECT_COOLDOWN_MAX_MS", "eject-cooldown-max-ms", "300000",
            milliseconds(0.01), "the longest an ejection lasts"),
    Setting("state_file", "STATE_FILE", "state-file", "./data/proxy_state.json", any_text,
            "JSON file holding nodes, active node and policy across restarts"),
    Setting("state_store", "STATE_STORE", "state-store", "file", parse_state_store,
            "where the fleet is kept: file (STATE_FILE, one process) or etcd://host:port/prefix, "
            "etcd+https://host:port/prefix (shared)",
            secret=True),  # never echoed: a password pasted into the URL must not reach an error
    Setting("etcd_timeout", "ETCD_TIMEOUT_MS", "etcd-timeout-ms", "2000", milliseconds(0.01),
            "timeout of every etcd call, in milliseconds (an admin write past it gets 503)"),
    Setting("etcd_user", "ETCD_USER", "etcd-user", "(none)", any_text,
            "etcd user to log in as (with ETCD_PASSWORD_FILE); unset: no login"),
    Setting("etcd_password_file", "ETCD_PASSWORD_FILE", "etcd-password-file", "(none)", any_text,
            "file holding the etcd user's password (read at each login, never logged)"),
    Setting("etcd_ca_file", "ETCD_CA_FILE", "etcd-ca-file", "(the system's)", any_text,
            "PEM CA bundle trusted for etcd+https instead of the system's"),
    Setting("workers", "WORKERS", "workers", "1", whole_number(1, 64),
            "proxy processes accepting on the listening port (above 1 needs STATE_STORE=etcd://...)"),
    Setting("worker_stop_timeout", "WORKER_STOP_TIMEOUT_MS", "worker-stop-timeout-ms", "30000",
            milliseconds(0.01), "how long stopping waits for workers to drain before killing them"),
    Setting("connect_timeout", "CONNECT_TIMEOUT_MS", "connect-timeout-ms", "5000",
            milliseconds(0.01), "timeout for connecting to a node, in milliseconds"),
    Setting("proxy_timeout", "PROXY_TIMEOUT", "proxy-timeout", "600000", milliseconds(0.01),
            "milliseconds to wait for a node's response headers"),
    Setting("idle_timeout", "IDLE_TIMEOUT_MS", "idle-timeout-ms", "300000", milliseconds(0.01),
            "milliseconds a response body may stay silent before it is cut"),
    Setting("header_timeout", "HEADER_TIMEOUT_MS", "header-timeout-ms", "30000", milliseconds(0.01),
            "milliseconds a client has to send a whole request head (408 after)"),
    Setting("body_timeout", "BODY_TIMEOUT_MS", "body-timeout-ms", "60000", milliseconds(0.01),
            "milliseconds a client has to send a whole request body, from the end of its head (408 after)"),
    Setting("sse_keepalive", "SSE_KEEPALIVE_MS", "sse-keepalive-ms", "15000", milliseconds(),
            "idle milliseconds before an SSE comment keeps a stream alive (0: off)"),
    Setting("max_attempts", "MAX_ATTEMPTS", "max-attempts", "3", whole_number(1, 20),
            "nodes tried per request before giving up (MAX_RETRIES=n means n+1)"),
    Setting("retry_delay", "RETRY_DELAY_MS", "retry-delay-ms", "0", milliseconds(),
            "milliseconds to wait before failing over to the next node"),
    Setting("retry_on_status", "RETRY_ON_STATUS", "retry-on-status", "502,503,504", retry_statuses,
            "node statuses that fail over to another node (none: never)"),
    Setting("max_body_bytes", "MAX_BODY_BYTES", "max-body-bytes", str(32 * 1024 * 1024),
            whole_number(0, 2**40), "largest request body accepted, in bytes (413 above)"),
    Setting("max_buffered_bytes", "MAX_BUFFERED_BYTES", "max-buffered-bytes", str(256 * 1024 * 1024),
            whole_number(1, 2**40), "request-body bytes held at once, all requests together (503 above)"),
    Setting("max_connections_per_client", "MAX_CONNECTIONS_PER_CLIENT", "max-connections-per-client", "256",
            whole_number(0, 1000000),
            "open connections per client address (429 above; 0: no limit; TRUST_FORWARDED peers are not limited)"),
    Setting("listen_backlog", "LISTEN_BACKLOG", "listen-backlog", "4096", whole_number(1, 65535),
            "connections the kernel queues before the proxy accepts them (capped by net.core.somaxconn)"),
    Setting("pool_max_idle", "POOL_MAX_IDLE", "pool-max-idle", "128", whole_number(0, 10000),
            "idle keep-alive connections kept per node"),
    Setting("pool_idle_timeout", "POOL_IDLE_TIMEOUT_MS", "pool-idle-timeout-ms", "4000",
            milliseconds(0.01), "milliseconds an idle upstream connection is kept"),
    Setting("tls_ca_file", "TLS_CA_FILE", "tls-ca-file", "(system roots)", any_text,
            "PEM bundle of CA certificates trusted for https nodes"),
    Setting("trust_forwarded", "TRUST_FORWARDED", "trust-forwarded", "false", parse_forward_trust,
            "keep incoming X-Forwarded-* headers from these peers: true, false, or addresses/CIDRs"),
    Setting("affinity_key", "AFFINITY_KEY", "affinity-key", "(off)", parse_affinity_source,
            "keep requests sharing this key on one node: header:NAME, cookie:NAME or query:NAME"),
    Setting("affinity_load_factor", "AFFINITY_LOAD_FACTOR", "affinity-load-factor", "1.25", factor,
            "a node above this multiple of the average in-flight count takes no new affinity keys"),
    Setting("node_max_inflight", "NODE_MAX_INFLIGHT", "node-max-inflight", "0", whole_number(0, 100000),
            "requests a node takes at once unless its max_inflight says otherwise (0: no cap)"),
    Setting("queue_max", "QUEUE_MAX", "queue-max", "100", whole_number(0, 100000),
            "requests that may wait for a slot when every node they may use is at its cap"),
    Setting("queue_timeout", "QUEUE_TIMEOUT_MS", "queue-timeout-ms", "30000", milliseconds(0.01),
            "how long a request waits for a slot before 503 queue_timeout"),
    Setting("rate_limit_rpm", "RATE_LIMIT_RPM", "rate-limit-rpm", "0", whole_number(0, 10**9),
            "requests per minute per caller key (0: no limit)"),
    Setting("rate_limit_tpm", "RATE_LIMIT_TPM", "rate-limit-tpm", "0", whole_number(0, 10**12),
            "tokens per minute per caller key (0: no limit)"),
    Setting("rate_limit_file", "RATE_LIMIT_FILE", "rate-limit-file", "(none)", any_text,
            "JSON file of per-key limits by key hash, reloaded on SIGHUP"),
    Setting("caller_key_header", "CALLER_KEY_HEADER", "caller-key-header", "(the API key)", header_name,
            "header naming the caller for the queue and the rate limits, before the API key and the address"),
    Setting("strip_origin", "STRIP_ORIGIN", "strip-origin", "false", parse_boolean,
            "drop the client's Origin header before forwarding"),
    Setting("ws_heartbeat", "WS_HEARTBEAT_MS", "ws-heartbeat-ms", "30000", milliseconds(),
            "idle milliseconds before TCP keep-alive probes check a WebSocket's peers (0: off)"),
    Setting("enable_metrics", "ENABLE_METRICS", "enable-metrics", "true", parse_boolean,
            "serve Prometheus metrics at /metrics"),
    Setting("metrics_token", "METRICS_TOKEN", None, "(none)", token,
            "token a scraper must send (X-Admin-Token or Bearer) to read /metrics; unset: open",
            secret=True),
    Setting("api_url", "API_URL", "api-url", "(off)", base_url_text,
            "workloads API for per-API-key node discovery, e.g. https://api.comput3.ai/api/v0"),
    Setting("workloads_timeout", "WORKLOADS_TIMEOUT_MS", "workloads-timeout-ms", "10000", milliseconds(0.01),
            "time a workloads API call may take, connecting and reading included"),
    Setting("workloads_node_scheme", "WORKLOADS_NODE_SCHEME", "workloads-node-scheme", "https",
            one_of(("https", "http")), "scheme of a discovered node's URL ({scheme}://{node})"),
    Setting("workloads_node_port", "WORKLOADS_NODE_PORT", "workloads-node-port", "0", whole_number(0, 65535),
            "port of a discovered node whose name has none; 0: the scheme's default"),
    Setting("workloads_node_allow", "WORKLOADS_NODE_ALLOW", "workloads-node-allow",
            "(any but loopback and link-local)", parse_node_allow,
            "host suffixes and CIDRs a discovered node must match, comma-separated"),
    Setting("workloads_policy", "WORKLOADS_POLICY", "workloads-policy", "least-inflight", one_of(POLICIES),
            "selection policy among an API key's workloads"),
    Setting("workloads_refresh", "WORKLOADS_REFRESH_MS", "workloads-refresh-ms", "60000", milliseconds(1.0),
            "how often the workloads of a key in use are fetched again"),
    Setting("workloads_idle", "WORKLOADS_IDLE_MS", "workloads-idle-ms", "180000", milliseconds(1.0),
            "a key unused this long, with nothing in flight, is forgotten"),
    Setting("workloads_negative_ttl", "WORKLOADS_NEGATIVE_TTL_MS", "workloads-negative-ttl-ms", "5000",
            milliseconds(), "an answer with no running workload, or a failed call with nothing cached, "
            "is reused this long"),
    Setting("workloads_rejected_ttl", "WORKLOADS_REJECTED_TTL_MS", "workloads-rejected-ttl-ms", "30000",
            milliseconds(), "a key the workloads API refused is refused this long without asking again"),
    Setting("workloads_stale_max", "WORKLOADS_STALE_MAX_MS", "workloads-stale-max-ms", "300000",
            milliseconds(), "while the workloads API fails, a cached list this old is still used"),
    Setting("workloads_max_keys", "WORKLOADS_MAX_KEYS", "workloads-max-keys", "10000", whole_number(1, 1000000),
            "most API keys cached at once (the least recently used is forgotten)"),
    Setting("workloads_max_calls", "WORKLOADS_MAX_CALLS", "workloads-max-calls", "8", whole_number(1, 1000),
            "most workloads API calls in progress at once"),
    Setting("workloads_lookups_per_client", "WORKLOADS_LOOKUPS_PER_CLIENT", "workloads-lookups-per-client", "4",
            whole_number(1, 1000), "most first lookups of unknown API keys under way at once for one client "
            "address (429 beyond)"),
    Setting("log_level", "LOG_LEVEL", "log-level", "INFO", log_level_name,
            "DEBUG, INFO, WARN or ERROR"),
    Setting("log_format", "LOG_FORMAT", "log-format", "text", one_of(("text", "json")),
            "text: twistd's log lines; json: one JSON object per line on standard output, Twisted's too"),
    Setting("access_log", "ACCESS_LOG", "access-log", "true", parse_boolean,
            "write one access line per finished request"),
    Setting("drain_grace", "DRAIN_GRACE_MS", "drain-grace-ms", "30000", milliseconds(),
            "on SIGTERM, milliseconds open requests and streams may take to finish before they are cut"),
    Setting("env_file", "ENV_FILE", "env-file", "(none)", any_text,
            "file of NAME=value settings read at start and again on SIGHUP (overrides the environment)"),
    Setting("demo", None, "demo", "0", whole_number(0, 64),
            "start this many simulated nodes in-process and register them"),
)

LISTEN_OPTION = Setting("listen", "LISTEN", "port", DEFAULT_LISTEN, strports,
                        "listening endpoint (strports); PROXY_PORT sets only its port")


SETTINGS_BY_FIELD = {s.field: s for s in SETTINGS}
