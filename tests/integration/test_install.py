"""The console scripts work after every ``pip install`` mode, in a fresh virtual environment.

Each test copies the source tree, makes an empty venv whose only extra path is
this interpreter's site-packages (a ``.pth`` file: the dependencies are found
there, nothing is downloaded), installs the copy with ``--no-deps
--no-build-isolation``, then runs ``blyan-proxy`` and ``blyan-devnode`` from the
venv's ``bin``. Plain ``pip install -e .`` (setuptools' default editable mode)
hides ``twisted/plugins`` from twistd; the console scripts do not need it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import pytest

from .processes import free_port

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0
_NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "data",
                                     "dropin.cache", ".hypothesis", ".pytest_cache")


def _environment(tmp_path: Path, editable: bool) -> Path:
    """A venv with the source installed (``-e`` when ``editable``); returns its ``bin`` directory."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    home = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(home)
    bin_dir = home / "bin"
    python = bin_dir / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(install + (["-e", str(source)] if editable else [str(source)]), check=True, cwd=tmp_path,
                   capture_output=True, timeout=120)
    return bin_dir


def _get(url: str) -> tuple[int, bytes]:
    """GET ``url`` once it answers (within WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stop(process: subprocess.Popen) -> str:
    """SIGTERM ``process``, wait for it, and return what it wrote; it must have stopped cleanly."""
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=WAIT)
    # twistd re-raises the signal that stopped it, the Unix convention for "stopped by SIGTERM".
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
    return output


def _run(bin_dir: Path, command: str, *arguments: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(bin_dir / command), *arguments], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-editable"])
def test_the_console_scripts_run_after_this_install_mode(tmp_path, editable):
    bin_dir = _environment(tmp_path, editable)
    node_port, proxy_port = free_port(), free_port()
    node = _run(bin_dir, "blyan-devnode", "--name", "gpu-a", "--port", f"tcp:{node_port}:interface=127.0.0.1",
                cwd=tmp_path)
    try:
        assert _get(f"http://127.0.0.1:{node_port}/health")[0] == 200  # up before the proxy's first probe
        proxy = _run(bin_dir, "blyan-proxy", "--node", f"gpu-a|http://127.0.0.1:{node_port}",
                     "--port", f"tcp:{proxy_port}:interface=127.0.0.1", cwd=tmp_path)
        try:
            status, body = _get(f"http://127.0.0.1:{proxy_port}/v1/models")
            assert status == 200 and b'"object":"list"' in body.replace(b" ", b"")  # answered by the proxy
            assert _get(f"http://127.0.0.1:{proxy_port}/_devnode/echo")[0] == 200  # forwarded to the node
        finally:
            proxy_output = _stop(proxy)
    finally:
        node_output = _stop(node)
    assert "GET /_devnode/echo status=200 node=gpu-a" in proxy_output
    assert "devnode gpu-a serving" in node_output
    refused = subprocess.run([str(bin_dir / "blyan-proxy"), "--workers", "0"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=WAIT)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.splitlines() == ["blyan-proxy: --workers: must be between 1 and 64 (got '0')"]


@pytest.mark.slow
def test_twistd_finds_the_plugins_after_a_regular_install(tmp_path):
    bin_dir = _environment(tmp_path, editable=False)
    for plugin in ("blyan-proxy", "blyan-devnode"):
        shown = subprocess.run(
            [str(bin_dir / "python"), "-c", "from twisted.scripts.twistd import run; run()", "-n", plugin, "--help"],
            cwd=tmp_path, capture_output=True, text=True, timeout=WAIT,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert f"Usage: twistd [options] {plugin} [options]" in shown.stdout


def test_the_console_scripts_are_installed_beside_this_interpreter():
    """The test environment (``pip install -e '.[test]'``) has them too: ``--help`` names the command."""
    for command in ("blyan-proxy", "blyan-devnode"):
        shown = subprocess.run([str(Path(sys.executable).parent / command), "--help"], capture_output=True,
                               text=True, timeout=WAIT)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"Usage: {command} [options]\n")
