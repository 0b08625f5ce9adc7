"""The deployment kit in etc/: install.sh (shellcheck, idempotent runs), the systemd unit, the Dockerfile."""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from blyanproxy.config import SETTINGS_BY_FIELD, settings_from

from .integration.tools import require_program

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
INSTALL = ETC / "install.sh"
UNIT = (ETC / "systemd" / "blyan-proxy.service").read_text()
DOCKERFILE = (ETC / "docker" / "Dockerfile").read_text()
REQUIREMENTS = ETC / "docker" / "requirements.txt"
BUILD_REQUIREMENTS = ETC / "docker" / "build-requirements.txt"


def test_install_script_passes_shellcheck():
    shellcheck = require_program("shellcheck")
    result = subprocess.run([shellcheck, "--severity=style", str(INSTALL)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def staged_host(tmp_path):
    """A PATH whose system commands only record their arguments (in ``calls``), and a staging root."""
    stubs, root, calls = tmp_path / "bin", tmp_path / "root", tmp_path / "calls"
    stubs.mkdir()
    root.mkdir()
    record = f'echo "$(basename "$0") $*" >> {calls}\n'
    for name in ("useradd", "chown", "systemctl", "nginx", "apt-get", "dpkg"):
        _stub(stubs, name, record)
    _stub(stubs, "getent", record + "exit 2\n")  # no such user (each time: the stub keeps no state)
    # A Python whose "-m venv DIR" makes a venv of recording stubs.
    _stub(stubs, "fakepython", record + (
        'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"\n'
        '  for tool in pip python; do printf \'#!/usr/bin/env bash\\necho "venv-$(basename "$0") $*" >> '
        f'{calls}\\n\' > "$3/bin/$tool"; chmod +x "$3/bin/$tool"; done\nfi\n'))
    return stubs, root, calls


def run_install(staged_host, *extra):
    stubs, root, calls = staged_host
    if calls.exists():
        calls.unlink()
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--domain", "proxy.example.com", "--python", "fakepython",
         "--no-apt", *extra],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, calls.read_text().splitlines()


def snapshot(root: Path) -> dict:
    """Every file below ``root``: its mode and content hash (symlinks: their target)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(root))] = ("link", os.readlink(path))
        elif path.is_file():
            files[str(path.relative_to(root))] = (stat.S_IMODE(path.stat().st_mode),
                                                  hashlib.sha256(path.read_bytes()).hexdigest())
    return files


def test_install_is_idempotent_and_checks_nginx_only_once_certificates_exist(staged_host):
    _, root, _ = staged_host
    out, calls = run_install(staged_host)
    env_file = root / "etc/blyan-proxy/blyan-proxy.env"
    token = re.search(r"^ADMIN_TOKEN=([0-9a-f]{64})$", env_file.read_text(), re.M).group(1)
    assert out.count(token) == 1  # shown once, on the terminal
    # Read by the service through its group, written only by root (the chown runs as root;
    # here it is a recording stub, so the mode is what can be checked).
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "var/lib/blyan-proxy").stat().st_mode) == 0o700
    assert "useradd --system --user-group --home-dir /var/lib/blyan-proxy --shell /usr/sbin/nologin blyan-proxy" \
        in calls
    assert f"chown root:blyan-proxy {env_file}" in calls
    assert "fakepython -m venv " + str(root / "opt/blyan-proxy/venv") in calls
    assert any(c.startswith("venv-pip install --quiet --upgrade ") and c.endswith(str(ROOT)) for c in calls)
    assert "systemctl daemon-reload" in calls and "systemctl enable blyan-proxy" in calls
    site = (root / "etc/nginx/sites-available/blyan-proxy.conf").read_text()
    assert "@" not in re.sub(r"#.*", "", site)  # every placeholder rendered
    assert "server 127.0.0.1:9000;" in site and "server_name proxy.example.com;" in site
    assert not (root / "etc/nginx/sites-enabled").exists()
    assert not any(c.startswith("nginx") for c in calls)  # no certificate yet: no "nginx -t"
    assert "not enabled yet" in out
    # The generated settings are valid.
    settings = settings_from(dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                                  if line and not line.startswith("#")), {})
    assert str(settings.trust_forwarded) == "127.0.0.1/32,::1/128"

    certificates = root / "etc/letsencrypt/live/proxy.example.com"
    certificates.mkdir(parents=True)
    (certificates / "fullchain.pem").write_text("cert")
    (certificates / "privkey.pem").write_text("key")
    before = snapshot(root / "etc/blyan-proxy")
    out, calls = run_install(staged_host)
    assert token not in out and "kept: " in out
    assert snapshot(root / "etc/blyan-proxy") == before
    assert "systemctl daemon-reload" not in calls
    assert os.readlink(root / "etc/nginx/sites-enabled/blyan-proxy.conf") == \
        "/etc/nginx/sites-available/blyan-proxy.conf"
    assert calls.index("nginx -t") < calls.index("systemctl reload nginx")

    everything = snapshot(root)
    out, calls = run_install(staged_host)
    assert snapshot(root) == everything
    assert "systemctl daemon-reload" not in calls and "nginx -t" not in calls
    assert "fakepython -m venv " + str(root / "opt/blyan-proxy/venv") not in calls


def test_install_refuses_bad_arguments(staged_host):
    stubs, root, _ = staged_host
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}")
    for args, message in (([], "--domain is required"), (["--domain", "a b"], "--domain must be a host name"),
                          (["--domain", "x", "--frobnicate"], "unknown option --frobnicate")):
        result = subprocess.run(["bash", str(INSTALL), "--root", str(root), *args], capture_output=True,
                                text=True, env=env, timeout=30)
        assert result.returncode == 1 and message in result.stderr
    assert list(root.iterdir()) == []


def test_a_rerun_gives_an_older_settings_file_its_owner_and_mode(staged_host):
    _, root, _ = staged_host
    run_install(staged_host)
    env_file = root / "etc/blyan-proxy/blyan-proxy.env"
    env_file.chmod(0o600)  # as earlier versions left it (owned by the service user)
    content = env_file.read_bytes()
    out, calls = run_install(staged_host)
    assert "kept: " in out and env_file.read_bytes() == content
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    assert f"chown root:blyan-proxy {env_file}" in calls


HOSTILE_VALUES = (
    "x;touch {marker};:#e;#",  # GNU sed's "e" flag runs the line as a command
    "/etc/ssl/$(touch {marker}).pem",
    "/a;b|c&d\\e/`touch {marker}`\nf",
)


@pytest.mark.parametrize("option", ["--cert", "--key", "--install-dir"])
@pytest.mark.parametrize("template", HOSTILE_VALUES)
def test_install_refuses_a_path_that_would_be_read_as_syntax(staged_host, tmp_path, option, template):
    stubs, root, _ = staged_host
    marker = tmp_path / "ran"
    value = template.format(marker=marker)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--domain", "proxy.example.com", "--python", "fakepython",
         "--no-apt", option, value],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert not marker.exists()  # no command ran
    assert result.returncode == 1 and f"{option} must be an absolute path" in result.stderr, result.stderr
    assert list(root.iterdir()) == []  # refused before anything was written


def test_install_writes_paths_literally(staged_host):
    _, root, _ = staged_host
    cert, key, install_dir = "/srv/tls/proxy_1+a.crt", "/srv/tls/proxy-1.key", "/srv/blyan.d/opt"
    run_install(staged_host, "--cert", cert, "--key", key, "--install-dir", install_dir)
    site = (root / "etc/nginx/sites-available/blyan-proxy.conf").read_text()
    assert f"    ssl_certificate {cert};\n" in site and f"    ssl_certificate_key {key};\n" in site
    unit = (root / "etc/systemd/system/blyan-proxy.service").read_text()
    assert f"ExecStart={install_dir}/venv/bin/twistd " in unit and "/opt/blyan-proxy" not in unit
    assert unit.replace(install_dir, "/opt/blyan-proxy") == UNIT  # nothing else changed
    assert site.endswith("}\n") and (ETC / "nginx" / "blyan-proxy.conf").read_text().endswith("}\n")


def _unit_value(key: str) -> str:
    return re.search(rf"^{key}=(.*)$", UNIT, re.M).group(1)


def test_the_unit_stops_after_the_drain_grace_and_reloads_with_sighup():
    grace_ms = float(SETTINGS_BY_FIELD["drain_grace"].default)
    assert float(_unit_value("TimeoutStopSec")) > grace_ms / 1000 + 5
    assert _unit_value("ExecStart") == "/opt/blyan-proxy/venv/bin/twistd --nodaemon --pidfile= blyan-proxy"
    assert _unit_value("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert _unit_value("Environment") == "ENV_FILE=/etc/blyan-proxy/blyan-proxy.env"
    assert "EnvironmentFile" not in UNIT  # the proxy reads the file itself, so a reload sees removals
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=blyan-proxy",
                    "User=blyan-proxy", "Restart=on-failure"):
        assert f"\n{setting}\n" in UNIT


def _name(requirement: str) -> str:
    """A requirement's project name, normalised (PEP 503): ``twisted[tls]>=25.5`` -> ``twisted``."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _hashed_pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``name -> (version, sha256 hashes)`` of a requirements file; AssertionError on any line that
    is not ``name==version`` with at least one ``--hash=sha256:``."""
    pins = {}
    for line in re.sub(r"\\\n", " ", re.sub(r"#.*", "", path.read_text())).splitlines():
        if not line.strip():
            continue
        match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)\s*", line)
        assert match, f"not a hashed pin: {line!r}"
        pins[_name(match.group(1))] = (match.group(2), re.findall(r"sha256:([0-9a-f]{64})", match.group(3)))
    return pins


def _run_lines(dockerfile: str) -> list[str]:
    """Each instruction of a Dockerfile on one line (continuations joined, comments left out)."""
    return re.sub(r"\\\n\s*", " ", re.sub(r"^\s*#.*\n", "", dockerfile, flags=re.M)).splitlines()


def test_the_container_image_is_pinned_by_digest_and_installs_only_hashed_packages():
    stages = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert len(stages) == 2 and all(re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", s) for s in stages)
    assert len(set(stages)) == 1  # both stages on the same base
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    install_requires = [r for r in setup["options"]["install_requires"].splitlines() if r.strip()]
    pins = _hashed_pins(REQUIREMENTS)
    for requirement in install_requires:
        assert _name(requirement) in pins, f"{requirement} is not pinned in {REQUIREMENTS.name}"
    assert {"pyopenssl", "service-identity", "wsproto"} <= set(pins)  # twisted's tls and websocket extras
    assert "setuptools" in _hashed_pins(BUILD_REQUIREMENTS)
    # Every pip that fetches or installs packages checks hashes; only the wheel built from this
    # tree goes in without one, offline and without dependencies (pip check then confirms them).
    commands = [command for instruction in _run_lines(DOCKERFILE) for command in instruction.split("&&")]
    pips = [command for command in commands if re.search(r"pip (install|download)", command)]
    assert pips
    for pip in pips:
        assert "--require-hashes" in pip or ("--no-index" in pip and "--no-deps" in pip and "blyanproxy-" in pip), pip
    assert any("--require-hashes -r /wheels/requirements.txt" in pip and "--no-index" in pip for pip in pips)
    assert "/opt/blyan-proxy/venv/bin/pip check" in DOCKERFILE
    assert "docker buildx imagetools inspect python:3.11-slim" in DOCKERFILE  # how to refresh the digest


def test_the_container_recipe_matches_the_tested_install_path():
    # The same steps as the installation CI tests: a venv, then pip install of this source tree.
    assert "pip wheel --no-cache-dir --no-deps --no-build-isolation --no-index --wheel-dir /wheels ." in DOCKERFILE
    assert "python -m venv /opt/blyan-proxy/venv" in DOCKERFILE
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install" in ci
    # The same command as the systemd unit, the same state directory, not root.
    assert 'CMD ["twistd", "--nodaemon", "--pidfile=", "blyan-proxy"]' in DOCKERFILE
    assert re.search(r"^USER blyan-proxy$", DOCKERFILE, re.M)
    assert re.search(r"^VOLUME /var/lib/blyan-proxy$", DOCKERFILE, re.M)
    assert "STATE_FILE=/var/lib/blyan-proxy/proxy_state.json" in DOCKERFILE
    assert "LISTEN=tcp:9000:interface=0.0.0.0" in DOCKERFILE
    assert "ca-certificates" in DOCKERFILE and re.search(r"^STOPSIGNAL SIGTERM$", DOCKERFILE, re.M)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\"", DOCKERFILE, re.M)
    # Every setting the image sets is a valid one.
    env = dict(re.findall(r"(LISTEN|STATE_FILE)=(\S+)", DOCKERFILE))
    assert settings_from(env, {}).listen == "tcp:9000:interface=0.0.0.0"
