"""The README stays true: it parses, documents every setting, and CI runs its test command."""

from pathlib import Path

import docutils.core
import pytest

from blyanproxy.config import LISTEN_OPTION, SETTINGS
from blyanproxy.tap import Options

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text()


def test_readme_is_valid_restructuredtext():
    docutils.core.publish_doctree(README, settings_overrides={"report_level": 2, "halt_level": 2})


@pytest.mark.parametrize("setting", SETTINGS + (LISTEN_OPTION,), ids=lambda s: s.field)
def test_every_setting_is_documented(setting):
    if setting.env:
        assert f"``{setting.env}``" in README
    if setting.option:
        assert f"``--{setting.option}``" in README


def test_every_option_is_documented():
    for long_name, *_ in Options.optParameters:
        assert f"``--{long_name}``" in README
    assert "``--node``" in README


def test_ci_runs_the_readme_test_command():
    test_command = next(line.strip() for line in README.splitlines() if "python -m pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    for step in test_command.split(" && ")[1:]:
        assert step in ci, step


def test_env_example_lists_every_variable_with_its_default():
    example = (ROOT / "etc" / "blyan-proxy.env.example").read_text()
    for setting in SETTINGS:
        if setting.env:
            default = "" if setting.default.startswith("(") else setting.default
            assert f"# {setting.env}={default}\n" in example, setting.env
