#!/usr/bin/env bash
# Install or update blyanproxy on a Debian-like host, behind nginx, as a systemd service.
#
#   sudo etc/install.sh --domain proxy.example.com [--cert FILE --key FILE]
#
# Safe to run again: the environment file (and its admin token) is kept, the systemd
# unit and the nginx site are rewritten only when they change, the package is
# upgraded from the source directory. The nginx site is enabled and checked only
# once its certificate and key exist.
#
# Options:
#   --domain NAME       server name of the nginx site (required)
#   --cert FILE         TLS certificate (default /etc/letsencrypt/live/NAME/fullchain.pem)
#   --key FILE          its private key (default /etc/letsencrypt/live/NAME/privkey.pem)
#   --install-dir DIR   where the virtual environment goes (default /opt/blyan-proxy)
#                       (these three: absolute paths of letters, digits and . _ + - / only)
#   --source DIR        the blyanproxy source tree to install (default: this script's ../)
#   --port PORT         loopback port the proxy listens on, behind nginx (default 9000)
#   --python PROGRAM    the Python that builds the virtual environment (default python3)
#   --root DIR          install below DIR instead of / (a staging tree; commands still run)
#   --no-apt            do not install missing Debian packages
set -euo pipefail

SERVICE=blyan-proxy
SERVICE_USER=blyan-proxy
DOMAIN=""
CERT=""
KEY=""
INSTALL_DIR=/opt/blyan-proxy
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT=9000
PYTHON=python3
ROOT=""
APT=yes

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --domain) DOMAIN="${2:?--domain needs a value}"; shift 2 ;;
        --cert) CERT="${2:?--cert needs a value}"; shift 2 ;;
        --key) KEY="${2:?--key needs a value}"; shift 2 ;;
        --install-dir) INSTALL_DIR="${2:?--install-dir needs a value}"; shift 2 ;;
        --source) SOURCE="${2:?--source needs a value}"; shift 2 ;;
        --port) PORT="${2:?--port needs a value}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs a value}"; shift 2 ;;
        --root) ROOT="${2:?--root needs a value}"; shift 2 ;;
        --no-apt) APT=no; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ -n "$DOMAIN" ] || die "--domain is required"
[[ "$DOMAIN" =~ ^[A-Za-z0-9.-]+$ ]] || die "--domain must be a host name"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"
[ -f "$SOURCE/setup.cfg" ] || die "$SOURCE is not a blyanproxy source tree"
CERT="${CERT:-/etc/letsencrypt/live/$DOMAIN/fullchain.pem}"
KEY="${KEY:-/etc/letsencrypt/live/$DOMAIN/privkey.pem}"

# A path written into the nginx site or the systemd unit: absolute, and only characters
# that neither reads as syntax (no blanks, newlines, quotes, ; $ % # \ { } or @).
plain_path() {
    [[ "$2" =~ ^/[A-Za-z0-9._+/-]*$ ]] ||
        die "$1 must be an absolute path of letters, digits and . _ + - / only, not $(printf %q "$2")"
}
plain_path --cert "$CERT"
plain_path --key "$KEY"
plain_path --install-dir "$INSTALL_DIR"

CONFIG_DIR="$ROOT/etc/$SERVICE"
ENV_FILE="$CONFIG_DIR/$SERVICE.env"
STATE_DIR="$ROOT/var/lib/$SERVICE"
VENV="$ROOT$INSTALL_DIR/venv"
UNIT="$ROOT/etc/systemd/system/$SERVICE.service"
SITE="$ROOT/etc/nginx/sites-available/$SERVICE.conf"
SITE_LINK="$ROOT/etc/nginx/sites-enabled/$SERVICE.conf"

step() {
    echo "==> $*"
}

# Print the file $1 with, for each FROM=TO argument, every FROM replaced by TO. Literal
# text replacement in the shell (no sed), so a value is never read as a command.
render() {
    local text pair
    text="$(cat "$1" && printf x)"
    text="${text%x}"  # the file's trailing newlines, which $(...) would drop
    shift
    for pair in "$@"; do
        text="${text//"${pair%%=*}"/"${pair#*=}"}"  # quoted: "&" in TO stays literal (bash 5.2)
    done
    printf '%s' "$text"
}

# Write stdin to $1 (mode $2) only when the content differs; says whether it changed.
install_if_changed() {
    local target="$1" mode="$2" staged
    staged="$(mktemp)"
    cat >"$staged"
    if [ -f "$target" ] && cmp -s "$staged" "$target"; then
        rm -f "$staged"
        echo "    unchanged: $target"
        return 1
    fi
    install -D -m "$mode" "$staged" "$target"
    rm -f "$staged"
    echo "    written: $target"
    return 0
}

packages() {
    local missing=() package
    for package in python3 python3-venv nginx openssl; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        step "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

service_user() {
    if getent passwd "$SERVICE_USER" >/dev/null; then
        echo "    user $SERVICE_USER exists"
    else
        step "creating the system user $SERVICE_USER"
        useradd --system --user-group --home-dir "/var/lib/$SERVICE" --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
}

directories() {
    step "directories"
    install -d -m 0755 "$ROOT$INSTALL_DIR"
    install -d -m 0750 "$CONFIG_DIR"
    install -d -m 0700 "$STATE_DIR"
    chown "root:$SERVICE_USER" "$CONFIG_DIR"
    chown "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR"
}

virtualenv() {
    step "virtual environment $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet --upgrade "$SOURCE"
    # Build Twisted's plugin cache now: the service cannot write to the venv later.
    "$VENV/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
    install -m 0644 "$SOURCE/README.rst" "$ROOT$INSTALL_DIR/README.rst"
}

new_token() {
    if command -v openssl >/dev/null; then
        openssl rand -hex 32
    else
        "$PYTHON" -c "import secrets; print(secrets.token_hex(32))"
    fi
}

# The service reads its settings through its group and cannot change them (an older
# install made the file the service user's own: a rerun corrects that).
env_file_access() {
    chown "root:$SERVICE_USER" "$ENV_FILE"
    chmod 0640 "$ENV_FILE"
}

env_file() {
    step "settings $ENV_FILE"
    if [ -f "$ENV_FILE" ]; then
        echo "    kept: $ENV_FILE (and its admin token)"
        env_file_access
        return
    fi
    local token staged
    token="$(new_token)"
    staged="$(mktemp)"
    chmod 0600 "$staged"
    {
        echo "# blyanproxy settings, read by the proxy at start and on 'systemctl reload $SERVICE'."
        echo "LISTEN=tcp:$PORT:interface=127.0.0.1"
        echo "STATE_FILE=/var/lib/$SERVICE/proxy_state.json"
        echo "TRUST_FORWARDED=127.0.0.1,::1"
        echo "ADMIN_TOKEN=$token"
        echo "# Add your nodes, for example:"
        echo "# NODE_0=gpu-a|http://10.0.0.11:8000"
        echo
        cat "$SOURCE/etc/blyan-proxy.env.example"
    } >"$staged"
    install -m 0640 "$staged" "$ENV_FILE"
    rm -f "$staged"
    env_file_access
    # Shown once, on the terminal only: it is in the file from now on.
    echo "    written: $ENV_FILE"
    echo
    echo "    Admin token (shown once; kept in $ENV_FILE):"
    echo "    $token"
    echo
}

systemd_unit() {
    step "systemd unit $UNIT"
    if render "$SOURCE/etc/systemd/$SERVICE.service" "/opt/blyan-proxy=$INSTALL_DIR" | install_if_changed "$UNIT" 0644; then
        systemctl daemon-reload
    fi
    systemctl enable "$SERVICE"
    if systemctl is-active --quiet "$SERVICE"; then
        echo "    $SERVICE is running: 'systemctl restart $SERVICE' picks up a new version (it drains first)"
    else
        systemctl start "$SERVICE"
    fi
}

nginx_site() {
    step "nginx site $SITE"
    local changed=no
    if render "$SOURCE/etc/nginx/$SERVICE.conf" "@DOMAIN@=$DOMAIN" "@HTTP_LISTEN@=80" "@HTTPS_LISTEN@=443" \
        "@UPSTREAM@=127.0.0.1:$PORT" "@CERT@=$CERT" "@KEY@=$KEY" | install_if_changed "$SITE" 0644; then
        changed=yes
    fi
    if [ ! -f "$ROOT$CERT" ] || [ ! -f "$ROOT$KEY" ]; then
        echo "    not enabled yet: no certificate at $CERT and $KEY."
        echo "    Obtain one (for example: certbot certonly --webroot -w /var/www/html -d $DOMAIN),"
        echo "    or pass --cert and --key, then run this script again."
        return
    fi
    if [ ! -L "$SITE_LINK" ]; then
        install -d -m 0755 "$(dirname "$SITE_LINK")"
        ln -s "/etc/nginx/sites-available/$SERVICE.conf" "$SITE_LINK"
        changed=yes
    fi
    if [ "$changed" = yes ]; then
        nginx -t
        systemctl reload nginx
        echo "    enabled and reloaded"
    else
        echo "    enabled, unchanged"
    fi
}

if [ "$APT" = yes ]; then
    packages
fi
service_user
directories
virtualenv
env_file
systemd_unit
nginx_site
step "done: https://$DOMAIN/ -> 127.0.0.1:$PORT"
