"""The boolean words, and the settings and knobs that read them."""

import pytest

from blyanproxy.config import ConfigError, settings_from
from blyanproxy.core.booleans import FALSE_WORDS, TRUE_WORDS, boolean_word, parse_boolean
from blyanproxy.core.trust import ForwardTrust, parse_forward_trust
from blyanproxy.devnode.config import parse_flag


@pytest.mark.parametrize("text, meaning", [("1", True), ("true", True), ("yes", True), ("on", True),
                                           ("0", False), ("false", False), ("no", False), ("off", False),
                                           (" TRUE ", True), ("Off", False)])
def test_the_words_and_their_meaning(text, meaning):
    assert boolean_word(text) is meaning
    assert parse_boolean(text) is meaning


@pytest.mark.parametrize("text", ["", "2", "y", "n", "truth", "enabled", "on off"])
def test_other_text_is_no_boolean_word(text):
    assert boolean_word(text) is None
    with pytest.raises(ValueError, match="expected true or false"):
        parse_boolean(text)


@pytest.mark.parametrize("word", sorted(TRUE_WORDS | FALSE_WORDS))
def test_every_reader_of_boolean_words_reads_them_alike(word):
    meaning = word in TRUE_WORDS
    assert parse_forward_trust(word) == ForwardTrust(everyone=meaning)
    assert parse_flag(word.upper()) is meaning
    assert settings_from({"STRIP_ORIGIN": word, "ACCESS_LOG": word}, {}).strip_origin is meaning
    spec = settings_from({"NODE_1": f"gpu|http://h:1|tls_verify={word}"}, {}).nodes[0]
    assert spec.tls_verify is meaning


def test_each_reader_keeps_its_own_refusal():
    with pytest.raises(ConfigError, match="ENABLE_METRICS: expected true or false"):
        settings_from({"ENABLE_METRICS": "maybe"}, {})
    with pytest.raises(ValueError, match="expected one of 1/0, true/false, yes/no, on/off"):
        parse_flag("maybe")
    assert parse_flag("") is False  # a knob given empty is off
