"""Property tests of settings parsing: every parser is total, every accepted value is usable."""

import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from blyanproxy.config import SETTINGS, ConfigError, Settings, settings_from

#: Text a user might put in a variable: digits, signs, units, separators, odd Unicode.
setting_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789.-+e, :/|=", max_size=30),
    st.from_regex(r"\A[0-9]{1,400}(\.[0-9]{1,5})?\Z"),
    st.sampled_from(["inf", "nan", "1e400", "٣", "²", " 5 ", "0x10", "-1", "", "\x00", "true", "none"]),
)

DURATION_FIELDS = [s.field for s in SETTINGS if s.env and s.env.endswith("_MS")] + ["proxy_timeout"]


def _check_usable(built: Settings) -> None:
    for field in DURATION_FIELDS:
        value = getattr(built, field)
        assert math.isfinite(value) and value >= 0, (field, value)


@settings(max_examples=300)
@given(st.sampled_from(SETTINGS), setting_text)
def test_every_setting_parser_is_total(setting, text):
    """A parser gives a value or ValueError; never another exception type."""
    try:
        setting.parse(text)
    except ValueError as exc:
        assert str(exc)


@settings(max_examples=300)
@given(st.sampled_from([s for s in SETTINGS if s.env]), setting_text)
@example(next(s for s in SETTINGS if s.env == "IDLE_TIMEOUT_MS"), "9" * 400)
def test_settings_from_the_environment_is_total_and_usable(setting, text):
    """Any value of any variable gives usable Settings, or a ConfigError naming the variable."""
    try:
        built = settings_from({setting.env: text}, {})
    except ConfigError as exc:
        assert setting.env in str(exc)
        if setting.secret:
            assert text not in str(exc) or len(text) < 4
    else:
        _check_usable(built)


@settings(max_examples=300)
@given(st.sampled_from([s for s in SETTINGS if s.option]), setting_text)
def test_settings_from_options_is_total_and_usable(setting, text):
    try:
        built = settings_from({}, {setting.option: text})
    except ConfigError as exc:
        assert "--" + setting.option in str(exc)
    else:
        _check_usable(built)


@given(st.dictionaries(
    st.one_of(st.sampled_from(["NODE_0", "NODE_1", "NODE_10", "MAX_RETRIES", "PROXY_PORT", "LISTEN"]),
              st.from_regex(r"\ANODE_[0-9]{1,3}\Z")),
    setting_text, max_size=4,
))
def test_nodes_and_special_variables_are_total(env):
    try:
        built = settings_from(env, {})
    except ConfigError as exc:
        assert any(name in str(exc) for name in env)
    else:
        assert all(spec.base_url.startswith(("http://", "https://")) for spec in built.nodes)
