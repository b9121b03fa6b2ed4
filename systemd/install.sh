#!/usr/bin/env bash
# Installs (or removes) SerenBox as a hardened systemd service. Idempotent: run it again to
# upgrade; an existing /etc/serenbox/serenbox.yaml and serenbox.env are never overwritten.
# See docs/install.md. Usage errors exit 2, failures exit 1, each with one line on stderr.
set -euo pipefail

readonly SERVICE=serenbox
readonly SERVICE_USER=serenbox
# Camera nodes belong to video (/dev/video*, /dev/media*, /dev/vchiq, /dev/dma_heap/*);
# render only matters to GPU-assisted pipelines. A group the system lacks is skipped.
readonly CAMERA_GROUPS=(video render)

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=/
WHEELHOUSE=
PYTHON=python3
SITE_PACKAGES=auto
START=1
ACTION=install
PURGE=0

usage() {
    cat <<EOF
Usage: sudo $0 [options]

Install SerenBox from this checkout: the user '$SERVICE_USER', a virtual environment in
/opt/serenbox/venv with the device dependencies (no TensorFlow), /etc/serenbox/serenbox.yaml
(if none exists), /etc/serenbox/serenbox.env for secrets, and the unit serenbox.service.

Options:
  --wheelhouse DIR            install offline from wheels built elsewhere (pip wheel -w DIR '.[device]')
  --python PYTHON             interpreter for the virtual environment (default: python3, >= 3.11)
  --system-site-packages      let the venv see apt's Python packages (python3-picamera2);
                              default: on when python3-picamera2 is installed
  --no-system-site-packages   an isolated venv even when python3-picamera2 is installed
  --no-start                  install and enable, but do not (re)start the service now
  --root DIR                  install into DIR instead of / (a staging tree or a test); no
                              service is started there
  --uninstall                 remove the service and /opt/serenbox; keeps the configuration
                              in /etc/serenbox and the spool in /var/lib/serenbox
  --purge                     with --uninstall: also remove those, the unit's drop-ins and
                              the user '$SERVICE_USER'
  -h, --help                  this help
EOF
}

usage_error() {
    echo "install.sh: $*" >&2
    echo "install.sh: see --help" >&2
    exit 2
}

fail() {
    echo "install.sh: $*" >&2
    exit 1
}

say() { echo "==> $*"; }

while (($#)); do
    case $1 in
        --root)
            (($# >= 2)) || usage_error "--root needs a directory"
            ROOT=$2
            shift 2
            ;;
        --wheelhouse)
            (($# >= 2)) || usage_error "--wheelhouse needs a directory"
            WHEELHOUSE=$2
            shift 2
            ;;
        --python)
            (($# >= 2)) || usage_error "--python needs an interpreter"
            PYTHON=$2
            shift 2
            ;;
        --system-site-packages) SITE_PACKAGES=yes; shift ;;
        --no-system-site-packages) SITE_PACKAGES=no; shift ;;
        --no-start) START=0; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown option: $1" ;;
    esac
done

((PURGE == 0)) || [[ $ACTION == uninstall ]] || usage_error "--purge only goes with --uninstall"
[[ -d $ROOT ]] || usage_error "--root $ROOT: no such directory"
if [[ -n $WHEELHOUSE && $ACTION == install ]]; then
    [[ -d $WHEELHOUSE ]] || usage_error "--wheelhouse $WHEELHOUSE: no such directory"
    compgen -G "$WHEELHOUSE/serenbox-*.whl" >/dev/null ||
        usage_error "--wheelhouse $WHEELHOUSE: no serenbox-*.whl in it (build it with: pip wheel -w DIR '.[device]')"
    WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
fi
ROOT=$(cd "$ROOT" && pwd)
# Every installed path is $PREFIX/...; empty for the real system.
PREFIX=${ROOT%/}
readonly OPT=$PREFIX/opt/serenbox
readonly VENV=$OPT/venv
readonly ETC=$PREFIX/etc/serenbox
readonly STATE=$PREFIX/var/lib/serenbox
readonly UNIT=$PREFIX/etc/systemd/system/$SERVICE.service
readonly CONFIG=$ETC/serenbox.yaml
readonly ENV_FILE=$ETC/serenbox.env

IS_ROOT=0
[[ $EUID -eq 0 ]] && IS_ROOT=1
if [[ -z $PREFIX ]] && ((!IS_ROOT)); then
    fail "must run as root to install into the system (sudo $0 ...), or use --root DIR"
fi
# Users and ownership need root; a staging tree built by a normal user gets neither.
MANAGE_USERS=$IS_ROOT
((MANAGE_USERS)) || say "not root: skipping the user '$SERVICE_USER' and file ownership in $ROOT"

# The real system's systemd is driven only when it is running (not in a chroot or container build).
systemd_running() { [[ -z $PREFIX && -d /run/systemd/system ]]; }

# --- users -------------------------------------------------------------------------------------

prefix_args=()
[[ -n $PREFIX ]] && prefix_args=(--prefix "$PREFIX")

lookup() { # lookup passwd|group NAME: the entry, from $PREFIX/etc when installing into a root
    if [[ -n $PREFIX ]]; then
        grep -s "^$2:" "$PREFIX/etc/$1" || true
    else
        getent "$1" "$2" || true
    fi
}

ensure_user() {
    if [[ -z $(lookup passwd "$SERVICE_USER") ]]; then
        if [[ -n $PREFIX && ! -f $PREFIX/etc/passwd ]]; then
            fail "--root $ROOT: $PREFIX/etc/passwd does not exist, cannot create the user '$SERVICE_USER'"
        fi
        useradd "${prefix_args[@]}" --system --user-group --home-dir /var/lib/serenbox --no-create-home \
            --shell /usr/sbin/nologin --comment "SerenBox daemon" "$SERVICE_USER"
        say "created the system user '$SERVICE_USER'"
    fi
    local group
    for group in "${CAMERA_GROUPS[@]}"; do
        if [[ -n $(lookup group "$group") ]]; then
            usermod "${prefix_args[@]}" --append --groups "$group" "$SERVICE_USER"
        fi
    done
}

# The numeric gid: `chown root:serenbox` would look the name up on the host, not in $PREFIX.
service_gid() { lookup group "$SERVICE_USER" | cut -d: -f3; }
service_uid() { lookup passwd "$SERVICE_USER" | cut -d: -f3; }

# --- files -------------------------------------------------------------------------------------

# install_file MODE OWNER:GROUP SOURCE DEST: write beside DEST, then rename, so a reader (systemd,
# the daemon) never sees a half-written file.
install_file() {
    local mode=$1 owner=$2 src=$3 dest=$4 tmp
    tmp=$(mktemp "$dest.XXXXXX")
    cat "$src" >"$tmp"
    chmod "$mode" "$tmp"
    ((MANAGE_USERS)) && chown "$owner" "$tmp"
    mv -f "$tmp" "$dest"
}

make_dir() { # make_dir MODE OWNER:GROUP DIR
    install -d -m "$1" "$3"
    chmod "$1" "$3" # install -d leaves an existing directory's mode alone
    if ((MANAGE_USERS)); then chown "$2" "$3"; fi
}

check_python() {
    command -v "$PYTHON" >/dev/null || fail "$PYTHON: not found (apt-get install python3 python3-venv)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        fail "$PYTHON is $("$PYTHON" -V 2>&1); SerenBox needs Python 3.11 or newer"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
        fail "$PYTHON cannot create virtual environments (apt-get install python3-venv)"
}

# copy_source DIR: what the package build needs (pyproject.toml and the packages it lists), without
# caches, build leftovers or a developer's .venv.
copy_source() {
    local dest=$1 part
    mkdir -p "$dest"
    for part in pyproject.toml README.md serenbox device converter training; do
        [[ -e $SRC/$part ]] || fail "$SRC/$part is missing: not a complete SerenBox checkout"
        cp -R "$SRC/$part" "$dest/" || fail "cannot copy $SRC/$part to $dest"
    done
    find "$dest" -depth \( -name __pycache__ -o -name '*.egg-info' \) -exec rm -rf {} + 2>/dev/null || true
}

install_venv() {
    check_python
    local site=()
    if [[ $SITE_PACKAGES == auto ]]; then
        SITE_PACKAGES=no
        "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("picamera2") is None)' &&
            SITE_PACKAGES=yes
    fi
    [[ $SITE_PACKAGES == yes ]] && site=(--system-site-packages)
    if [[ ! -x $VENV/bin/python ]]; then
        say "creating the virtual environment $VENV ${site[*]}"
        "$PYTHON" -m venv "${site[@]}" "$VENV"
    fi

    local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --upgrade)
    if [[ $SITE_PACKAGES == yes ]]; then
        # picamera2 and its helpers (simplejpeg, ...) from apt are built against apt's numpy; a
        # newer numpy in the venv would shadow it and break them, so keep the one apt installed.
        local numpy
        if numpy=$("$PYTHON" -c 'import numpy; print(numpy.__version__)' 2>/dev/null); then
            printf 'numpy==%s\n' "$numpy" >"$WORK/constraints.txt"
            pip+=(--constraint "$WORK/constraints.txt")
            say "keeping apt's numpy $numpy for picamera2"
        fi
    fi
    if [[ -n $WHEELHOUSE ]]; then
        say "installing serenbox[device] offline from $WHEELHOUSE"
        "${pip[@]}" --no-index --find-links "$WHEELHOUSE" 'serenbox[device]' ||
            fail "pip could not install from $WHEELHOUSE (a wheel missing, or built for another Python or CPU?)"
    else
        # pip builds in the source tree (setuptools writes serenbox.egg-info there), which fails in a
        # read-only checkout (a mounted release, a root-owned copy): build from a private copy.
        local build=$WORK/src
        copy_source "$build"
        say "installing ${SRC}[device] (downloads from PyPI)"
        "${pip[@]}" "${build}[device]" ||
            fail "pip could not install ${SRC}[device] (see pip's message above: no network? then use --wheelhouse)"
    fi
    # The promise of the device extra: TensorFlow never reaches the box.
    if "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("tensorflow") is None)'; then
        fail "tensorflow ended up in $VENV; the device needs only .[device]"
    fi
    [[ -x $VENV/bin/serenbox ]] || fail "$VENV/bin/serenbox is missing after pip install"
}

install_config() {
    local gid=${1:-0}
    make_dir 0750 "0:$gid" "$ETC"
    # The shipped default is refreshed on every run, so `diff serenbox.yaml.default serenbox.yaml`
    # shows an operator what changed after an upgrade.
    install_file 0640 "0:$gid" "$SRC/configs/serenbox.yaml" "$ETC/serenbox.yaml.default"
    if [[ -e $CONFIG ]]; then
        say "kept the existing $CONFIG"
    else
        install_file 0640 "0:$gid" "$SRC/configs/serenbox.yaml" "$CONFIG"
        say "installed the default configuration $CONFIG"
    fi
    if [[ -e $ENV_FILE ]]; then
        chmod 0600 "$ENV_FILE" # secrets: never readable by anyone but root, whatever was done by hand
    else
        cat >"$WORK/serenbox.env" <<'EOF'
# Secrets for serenbox.service, read by systemd as root (keep this file mode 0600).
# They override mqtt.username / mqtt.password in serenbox.yaml. After a change:
#   systemctl restart serenbox
#SERENBOX_MQTT_USERNAME=serenbox
#SERENBOX_MQTT_PASSWORD=
EOF
        install_file 0600 0:0 "$WORK/serenbox.env" "$ENV_FILE"
        say "created $ENV_FILE for the MQTT credentials (mode 0600)"
    fi
}

enable_service() {
    if [[ -n $PREFIX ]]; then
        if command -v systemctl >/dev/null; then
            systemctl --root="$ROOT" enable "$SERVICE.service"
        fi
        say "installed into $ROOT; no service started there"
        return
    fi
    if ! systemd_running; then
        systemctl enable "$SERVICE.service"
        say "systemd is not running here: enabled for the next boot, not started"
        return
    fi
    systemctl daemon-reload
    systemctl enable "$SERVICE.service"
    if ((START)); then
        # restart, not start: a re-run after an upgrade must load the new code.
        if ! systemctl restart "$SERVICE.service"; then
            # systemctl's own line names no cause; the daemon's error is in the journal.
            echo "install.sh: the last lines of its log:" >&2
            journalctl -u "$SERVICE" -n 10 --no-pager -o cat 2>/dev/null | sed 's/^/    /' >&2 || true
            fail "installed, but $SERVICE.service did not start: read 'journalctl -u $SERVICE -n 50', fix the cause (often /etc/serenbox/serenbox.yaml), then 'systemctl restart $SERVICE'"
        fi
        say "started $SERVICE.service"
    else
        say "enabled, not started (--no-start): systemctl start $SERVICE"
    fi
}

do_install() {
    [[ -f $SRC/systemd/$SERVICE.service && -f $SRC/configs/serenbox.yaml ]] ||
        fail "$SRC does not look like a SerenBox checkout (systemd/$SERVICE.service, configs/serenbox.yaml)"
    command -v systemctl >/dev/null || [[ -n $PREFIX ]] || fail "systemctl not found: this system does not run systemd"
    local uid=0 gid=0
    if ((MANAGE_USERS)); then
        ensure_user
        uid=$(service_uid)
        gid=$(service_gid)
    fi
    make_dir 0755 0:0 "$OPT"
    install_venv
    make_dir 0755 0:0 "$OPT/doc"
    install_file 0644 0:0 "$SRC/docs/install.md" "$OPT/doc/install.md"
    install_config "$gid"
    # systemd creates it on start too (StateDirectory=); made here so a staging tree is complete.
    make_dir 0700 "$uid:$gid" "$STATE"
    make_dir 0755 0:0 "$(dirname "$UNIT")"
    install_file 0644 0:0 "$SRC/systemd/$SERVICE.service" "$UNIT"
    say "installed $UNIT"
    enable_service
    cat <<EOF

SerenBox is installed.
  configuration  $CONFIG   (secrets: $ENV_FILE)
  spool          $STATE
  status         systemctl status $SERVICE
  logs           journalctl -u $SERVICE -f
  after editing  systemctl reload $SERVICE   (restart for camera, model or MQTT changes)
EOF
}

# forget_home_assistant: the box is gone for good, so ask Home Assistant to drop its device (an
# empty retained discovery config). Best effort: an unreachable broker never stops an uninstall.
forget_home_assistant() {
    [[ -x $VENV/bin/serenbox && -f $CONFIG ]] || return 0
    local -a secrets=()
    local line value
    if [[ -f $ENV_FILE ]]; then
        while IFS= read -r line || [[ -n $line ]]; do
            [[ $line =~ ^(SERENBOX_MQTT_USERNAME|SERENBOX_MQTT_PASSWORD)=(.*)$ ]] || continue
            value=${BASH_REMATCH[2]}
            # systemd's EnvironmentFile= strips one pair of quotes around a value; so do we.
            [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]] && value=${BASH_REMATCH[1]}
            secrets+=("${line%%=*}=$value")
        done <"$ENV_FILE"
    fi
    # ha-remove says nothing is to be done when the configuration has no mqtt.host.
    if ! env "${secrets[@]}" timeout 30 "$VENV/bin/serenbox" ha-remove --config "$CONFIG"; then
        say "could not remove this box from Home Assistant (see above); delete the device there by hand"
    fi
}

do_uninstall() {
    if [[ -n $PREFIX ]]; then
        if [[ -e $UNIT ]] && command -v systemctl >/dev/null; then
            systemctl --root="$ROOT" disable "$SERVICE.service" || true
        fi
    elif systemd_running; then
        systemctl disable --now "$SERVICE.service" 2>/dev/null || true
    elif command -v systemctl >/dev/null; then
        systemctl disable "$SERVICE.service" 2>/dev/null || true
    fi
    rm -f "$UNIT"
    systemd_running && systemctl daemon-reload
    ((PURGE == 0)) || forget_home_assistant
    rm -rf "$OPT"
    say "removed $SERVICE.service and $OPT"
    if ((PURGE)); then
        # Drop-ins (systemctl edit serenbox) are local configuration too.
        rm -rf "$ETC" "$STATE" "$UNIT.d"
        if ((MANAGE_USERS)) && [[ -n $(lookup passwd "$SERVICE_USER") ]]; then
            userdel "${prefix_args[@]}" "$SERVICE_USER"
        fi
        say "purged $ETC, $STATE, $UNIT.d and the user '$SERVICE_USER'"
    else
        say "kept $ETC and $STATE (--uninstall --purge removes them)"
    fi
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ $ACTION == install ]]; then
    do_install
else
    do_uninstall
fi
