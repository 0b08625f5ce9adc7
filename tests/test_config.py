"""Settings parsing: defaults, environment, options, precedence and every refusal."""

import re

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.config import ConfigError, Settings, parse_node, settings_from
from blyanproxy.core.trust import ForwardTrust


def build(env=None, options=None, nodes=()):
    return settings_from(env or {}, options or {}, nodes)


def test_defaults():
    settings = build()
    assert settings == Settings()
    assert settings.listen == "tcp:9000:interface=127.0.0.1"
    assert settings.health_interval == 5.0
    assert settings.health_timeout == 3.0
    assert settings.health_paths == ()
    assert settings.state_file == "./data/proxy_state.json"
    assert settings.proxy_timeout == 600.0
    assert settings.max_attempts == 3
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.selection_policy == "active-first"
    assert settings.nodes == ()


def test_environment_values():
    settings = build(
        {
            "PROXY_PORT": "9100",
            "ADMIN_TOKEN": "s3cret-token-0123456789",
            "SELECTION_POLICY": "round-robin",
            "HEALTH_INTERVAL_MS": "2500",
            "HEALTH_TIMEOUT_MS": "750",
            "HEALTH_PATHS": "/health, /pol/status",
            "STATE_FILE": "/var/lib/blyan/state.json",
            "PROXY_TIMEOUT": "120000",
            "API_URL": "https://api.example.com/api/v0/",
            "LOG_LEVEL": "warn",
            "TRUST_FORWARDED": "yes",
            "RETRY_ON_STATUS": "none",
        }
    )
    assert settings.listen == "tcp:9100:interface=127.0.0.1"
    assert settings.admin_token == "s3cret-token-0123456789"
    assert settings.selection_policy == "round-robin"
    assert settings.health_interval == 2.5
    assert settings.health_timeout == 0.75
    assert settings.health_paths == ("/health", "/pol/status")
    assert settings.state_file == "/var/lib/blyan/state.json"
    assert settings.proxy_timeout == 120.0
    assert settings.api_url == "https://api.example.com/api/v0"
    assert settings.log_level == "WARN"
    assert settings.trust_forwarded == ForwardTrust(everyone=True)
    assert settings.retry_on_status == frozenset()


def test_options_beat_environment():
    settings = build(
        {"SELECTION_POLICY": "round-robin", "HEALTH_INTERVAL_MS": "2500", "PROXY_PORT": "9100"},
        {"policy": "least-latency", "health-interval-ms": "1000", "port": "tcp:0:interface=127.0.0.1"},
    )
    assert settings.selection_policy == "least-latency"
    assert settings.health_interval == 1.0
    assert settings.listen == "tcp:0:interface=127.0.0.1"


def test_empty_variable_counts_as_unset():
    assert build({"SELECTION_POLICY": "", "API_URL": ""}) == Settings()


def test_nodes_from_environment_in_numeric_order_not_capped_at_nine():
    env = {f"NODE_{n}": f"gpu{n}|http://10.0.0.{n}:8000/" for n in (12, 0, 3, 10)}
    settings = build(env, nodes=["extra|https://gpu.example.com|weight=3|tags=a100,eu|tls_verify=false"])
    assert [n.name for n in settings.nodes] == ["gpu0", "gpu3", "gpu10", "gpu12", "extra"]
    assert settings.nodes[0].base_url == "http://10.0.0.0:8000"
    assert settings.nodes[0].source == "NODE_0"
    extra = settings.nodes[-1]
    assert (extra.weight, extra.tags, extra.tls_verify, extra.source) == (3, ("a100", "eu"), False, "--node")


def test_max_retries_maps_to_attempts():
    assert build({"MAX_RETRIES": "4"}).max_attempts == 5


@pytest.mark.parametrize(
    "env, options, expected",
    [
        ({"HEALTH_INTERVAL_MS": "five"}, {}, "HEALTH_INTERVAL_MS: expected a number of milliseconds (got 'five')"),
        ({}, {"health-interval-ms": "-1"}, "--health-interval-ms: expected a number of milliseconds (got '-1')"),
        ({"SELECTION_POLICY": "fastest"}, {}, "SELECTION_POLICY: expected one of active-first"),
        ({"NODE_3": "gpu3"}, {}, "NODE_3: expected name|url, the form name|url[|weight=N|"),
        ({"NODE_3": "gpu3|ftp://x"}, {}, "NODE_3: url: must start with http:// or https:// (got 'ftp://x')"),
        ({"NODE_3": "gpu3|http://u:p@x"}, {}, "NODE_3: url: must not carry credentials (got 'http://***@x')"),
        ({"NODE_3": "gpu3|http://x|colour=red"}, {}, "NODE_3: unknown key 'colour'"),
        ({"NODE_3": "gpu3|http://x|weight=0"}, {}, "NODE_3: weight: must be a whole number from 1 to 1000 (got '0')"),
        ({"NODE_3": "gpu3|http://x|tls_verify=maybe"}, {}, "NODE_3: tls_verify: expected true or false (got 'maybe')"),
        ({"NODE_3": "|http://x"}, {}, "NODE_3: name: must be 1 to 128 printable characters"),
        ({}, {"api-url": "https://user:hunter2@api.example.com"}, "--api-url: must not carry credentials (got "
         "'https://***@api.example.com')"),
        (
            {"NODE_1": "a|http://x:1", "NODE_2": "b|http://x:1/"}, {},
            "NODE_2: base URL http://x:1 is already used by NODE_1",
        ),
        ({"API_URL": "api.example.com"}, {}, "API_URL: must start with http:// or https://"),
        ({"LOG_LEVEL": "loud"}, {}, "LOG_LEVEL: expected DEBUG, INFO, WARN or ERROR (got 'loud')"),
        ({"PROXY_PORT": "70000"}, {}, "PROXY_PORT: must be between 0 and 65535 (got '70000')"),
        ({"LISTEN": "tcp:1", "PROXY_PORT": "2"}, {}, "LISTEN and PROXY_PORT are both set"),
        ({"HEALTH_PATHS": "health"}, {}, "HEALTH_PATHS: 'health' is not an absolute path"),
        ({"RETRY_ON_STATUS": "404"}, {}, "RETRY_ON_STATUS: expected 5xx status codes"),
        ({"TRUST_FORWARDED": "maybe"}, {}, "TRUST_FORWARDED: expected true, false or addresses/CIDRs"),
        ({"MAX_RETRIES": "2", "MAX_ATTEMPTS": "3"}, {}, "MAX_RETRIES and MAX_ATTEMPTS/--max-attempts are both set"),
        ({}, {"max-attempts": "0"}, "--max-attempts: must be between 1 and 20 (got '0')"),
    ],
)
def test_bad_values_name_the_setting_and_value(env, options, expected):
    with pytest.raises(ConfigError) as caught:
        build(env, options)
    assert expected in str(caught.value)


@pytest.mark.parametrize("env", [
    {"NODE_0": "gpu|http://user:hunter2@host"},
    {"NODE_0": "gpu|https://hunter2@host|weight=0"},
    {"NODE_0": "gpu|http://user:hunter2@host:abc"},
    {"NODE_0": "gpu|http://user:hunter2@host|colour"},
    {"API_URL": "https://user:hunter2@api.example.com"},
    {"STATE_STORE": "etcd://root:hunter2@etcd:2379/fleet"},
])
def test_a_refused_value_never_shows_a_password(env):
    with pytest.raises(ConfigError) as caught:
        build(env)
    assert next(iter(env)) in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_a_bad_token_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as caught:
        build({"ADMIN_TOKEN": "short secret"})
    assert "ADMIN_TOKEN" in str(caught.value)
    assert "short secret" not in str(caught.value)


def test_settings_repr_hides_the_token():
    assert "hunter2hunter2hunter2" not in repr(build({"ADMIN_TOKEN": "hunter2hunter2hunter2"}))


@given(st.text(max_size=80))
def test_parse_node_is_total(text):
    """Any text either parses to a node or raises ValueError with a reason."""
    try:
        spec = parse_node(text, "NODE_0")
    except ValueError as exc:
        assert str(exc)
    else:
        assert spec.base_url.startswith(("http://", "https://"))
        assert "|" not in spec.name


@given(st.dictionaries(
    st.sampled_from(
        ["HEALTH_INTERVAL_MS", "MAX_ATTEMPTS", "PROXY_PORT", "SELECTION_POLICY", "LOG_LEVEL", "HEALTH_PATHS"]
    ),
    st.text(max_size=12),
))
def test_settings_from_is_total(env):
    """Whatever the environment holds, the result is Settings or a ConfigError naming a variable."""
    try:
        build(env)
    except ConfigError as exc:
        assert any(name in str(exc) for name in env)


def test_the_config_package_face_keeps_every_name_its_importers_use():
    import blyanproxy.config as config

    for name in ("ConfigError", "LISTEN_OPTION", "NodeSpec", "SETTINGS", "SETTINGS_BY_FIELD", "Setting",
                 "Settings", "parse_node", "settings_from"):
        assert name in config.__all__ and hasattr(config, name), name
    assert set(config.SETTINGS_BY_FIELD) == {s.field for s in config.SETTINGS}
    assert {s.field for s in config.SETTINGS} | {"listen", "nodes"} == set(attrs.fields_dict(Settings))


def test_a_password_pasted_into_the_state_store_never_reaches_the_error():
    with pytest.raises(ConfigError) as caught:
        build({"STATE_STORE": "etcd+https://root:Hunter2-secret@etcd:2379/blyan"})
    assert str(caught.value).startswith("STATE_STORE: credentials do not go in STATE_STORE")
    assert "Hunter2" not in str(caught.value)


@pytest.mark.parametrize("env, expected", [
    ({"STATE_STORE": "etcd://h/p", "ETCD_USER": "blyan"}, "ETCD_USER and ETCD_PASSWORD_FILE go together"),
    ({"STATE_STORE": "etcd://h/p", "ETCD_PASSWORD_FILE": "/pw"}, "ETCD_USER and ETCD_PASSWORD_FILE go together"),
    ({"ETCD_USER": "blyan", "ETCD_PASSWORD_FILE": "/pw"}, "ETCD_USER: needs STATE_STORE=etcd://"),
    ({"ETCD_CA_FILE": "/ca.pem"}, "ETCD_CA_FILE: needs STATE_STORE=etcd://"),
    ({"STATE_STORE": "etcd://h/p", "ETCD_CA_FILE": "/ca.pem"}, "ETCD_CA_FILE: needs STATE_STORE=etcd+https://"),
])
def test_the_etcd_login_and_ca_need_each_other_and_an_etcd_store(env, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build(env)


def test_etcd_over_tls_with_a_login():
    found = build({"STATE_STORE": "etcd+https://etcd:2379/blyan", "ETCD_USER": "blyan",
                      "ETCD_PASSWORD_FILE": "/etc/blyan-proxy/etcd-password", "ETCD_CA_FILE": "/ca.pem"})
    assert found.state_store.base_url == "https://etcd:2379"
    assert (found.etcd_user, found.etcd_password_file, found.etcd_ca_file) == (
        "blyan", "/etc/blyan-proxy/etcd-password", "/ca.pem")
