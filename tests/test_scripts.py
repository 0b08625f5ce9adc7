"""The console scripts' plugin hand-over: twistd's options knowing one plugin, without a plugin search."""

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from blyanproxy.scripts import BlyanDevNode, BlyanProxy, run_plugin, twistd_options


def test_twistd_options_know_the_one_plugin_and_parse_its_options():
    config = twistd_options(BlyanProxy)
    config.parseOptions(["--nodaemon", "--pidfile=", "blyan-proxy", "--demo", "2", "--policy", "round-robin"])
    assert config.subCommand == "blyan-proxy"
    assert config.loadedPlugins == {"blyan-proxy": BlyanProxy}
    assert (config.subOptions.settings.demo, config.subOptions.settings.selection_policy) == (2, "round-robin")
    assert config["nodaemon"] and config["pidfile"] == ""


def test_the_usage_line_names_the_command():
    config = twistd_options(BlyanDevNode)
    config.parseOptions(["--nodaemon", "blyan-devnode"])
    assert str(config.subOptions).startswith("Usage: blyan-devnode [options]\n")


@pytest.mark.parametrize("maker, arguments, message", [
    (BlyanProxy, ["--no-such-option"], "blyan-proxy: option --no-such-option not recognized"),
    (BlyanDevNode, ["--tps", "0"], "blyan-devnode: --tps"),
])
def test_a_bad_option_is_one_line_without_the_help(capsys, maker, arguments, message):
    with pytest.raises(SystemExit) as stopped:
        run_plugin(maker, arguments)
    assert str(stopped.value.code).startswith(message)
    assert "\n" not in str(stopped.value.code)
    assert capsys.readouterr().out == ""


def test_a_bad_setting_is_one_line_naming_it(capsys, monkeypatch):
    monkeypatch.setenv("HEALTH_INTERVAL_MS", "soon")
    with pytest.raises(SystemExit) as stopped:
        run_plugin(BlyanProxy, [])
    assert stopped.value.code == "blyan-proxy: HEALTH_INTERVAL_MS: expected a number of milliseconds (got 'soon')"
    assert capsys.readouterr().out == ""


def test_twistd_finds_the_same_plugins_in_twisted_plugins():
    found = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert found["blyan-proxy"] is BlyanProxy and found["blyan-devnode"] is BlyanDevNode
