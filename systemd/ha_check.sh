#!/usr/bin/env bash
# SerenBox against Home Assistant itself: Home Assistant core (from PyPI, in a Debian trixie root
# for its Python 3.13) reads SerenBox's MQTT discovery from a local mosquitto, and its REST and
# websocket APIs must show the device, every entity, the emotion following the clip, the event
# entity firing, the switch pausing the box and `serenbox ha-remove` deleting the device.
# See docs/mqtt.md, "Home Assistant", and docs/install.md.
#
#   sudo systemd/ha_check.sh             build or reuse the root and Home Assistant, run the checks
#   sudo systemd/ha_check.sh --prepare   only build the cached root, wheels and Home Assistant venv
#
# The root, the wheels and Home Assistant's venv are cached in $SERENBOX_HA_CACHE (default
# /var/cache/serenbox-ha): a second run downloads nothing. Home Assistant runs in
# systemd-nspawn on a read-only root with the host's network, its HTTP server on 127.0.0.1 only;
# the broker and the SerenBox daemon run on the host ($SERENBOX_HA_PYTHON, default the
# checkout's .venv, with this checkout first on PYTHONPATH). Nothing is left behind: no
# container, process, mount or cgroup, no changed host file. Exit 0 only when every check held;
# 1 when one did not; 2 for a usage or setup problem.
set -euo pipefail

readonly SUITE=trixie # Python 3.13.5, glibc 2.41
# gcc and python3-dev build the sdists among Home Assistant's requirements.
readonly INCLUDE=python3,python3-venv,python3-dev,gcc,ca-certificates,tzdata
# The newest Home Assistant that runs on trixie's Python 3.13 (later ones need 3.14).
readonly HA_VERSION=2026.2.3
# What the integrations Home Assistant always loads (frontend, backup, hardware, ...) and mqtt
# need, pinned as in HA_VERSION's manifests: with --skip-pip nothing is installed at run time.
readonly HA_REQUIREMENTS="homeassistant==$HA_VERSION paho-mqtt==2.1.0 home-assistant-frontend==20260128.6 \
Pillow==12.0.0 cronsim==2.7 securetar==2025.2.1 ifaddr==0.2.0 isal==1.8.0 psutil-home-assistant==0.0.1"

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly SRC
CACHE=${SERENBOX_HA_CACHE:-/var/cache/serenbox-ha}
MIRROR=${SERENBOX_HA_MIRROR:-http://deb.debian.org/debian}
PYTHON=${SERENBOX_HA_PYTHON:-$SRC/.venv/bin/python}

usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
}

die() { # a setup problem, not a failed check
    echo "ha_check.sh: $*" >&2
    exit 2
}

PREPARE_ONLY=0
while (($#)); do
    case $1 in
        --prepare) PREPARE_ONLY=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (usage: ha_check.sh [--prepare])" ;;
    esac
done
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, systemd-nspawn): sudo $0"
[[ $(uname -m) == x86_64 ]] || die "runs on an x86_64 host"
need=(debootstrap:debootstrap systemd-nspawn:systemd-container mosquitto:mosquitto mosquitto_passwd:mosquitto
    unshare:util-linux ip:iproute2 ss:iproute2)
missing=()
for pair in "${need[@]}"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
((${#missing[@]} == 0)) ||
    die "missing ${missing[*]}: apt-get install --no-install-recommends ${missing[*]} (no recommends: libnss-mymachines would rewrite /etc/nsswitch.conf)"
if ((!PREPARE_ONLY)); then
    [[ -x $PYTHON ]] || die "no Python at $PYTHON (set SERENBOX_HA_PYTHON to the venv with serenbox[dev])"
    PYTHONPATH=$SRC "$PYTHON" -c 'import serenbox.device, tensorflow, websockets, requests' >/dev/null 2>&1 ||
        die "$PYTHON lacks serenbox's dev dependencies (tensorflow, websockets, requests): pip install -e '.[dev]'"
fi

say() { printf '%s ha_check: %s\n' "$(date -u +%T)" "$*"; }
START_S=$SECONDS

# --- host state, teardown ----------------------------------------------------------------------

RUN=
readonly MACHINE=serenbox-ha-check
readonly HOST_FILES=(/etc/nsswitch.conf /etc/passwd /etc/group /etc/shadow /etc/hosts /etc/resolv.conf /etc/fstab)

host_state() { # what the check must leave as it found it, one line per item
    local f
    for f in "${HOST_FILES[@]}"; do
        [[ -e $f ]] && echo "file $f $(sha256sum <"$f" | cut -c1-16)"
    done
    # nspawn's cgroups (payload, supervisor); other cgroups come and go with the host's other work.
    find /sys/fs/cgroup -mindepth 1 -type d \( -name payload -o -name supervisor \) -printf 'cgroup %p\n' 2>/dev/null | sort
    grep -F "$CACHE" /proc/self/mountinfo | sed 's/^/mount /' || true
    pgrep -a -f "systemd-nspawn .*$MACHINE" | sed 's/^/process /' || true
    pgrep -a -f "$CACHE/run\." | sed 's/^/process /' || true
}

remove_new_cgroups() { # nspawn's payload cgroups, if it left any (deepest first; only empty ones)
    [[ -n ${CGROUPS_BEFORE:-} && -f $CGROUPS_BEFORE ]] || return 0
    local dir
    find /sys/fs/cgroup -mindepth 1 -type d \( -name payload -o -name supervisor \) 2>/dev/null | sort -r | while read -r dir; do
        grep -qxF "$dir" "$CGROUPS_BEFORE" || rmdir "$dir" 2>/dev/null || true
    done
}

teardown() {
    # The driver stops what it started; this is for a driver that was itself killed.
    local pid
    for pid in $(pgrep -f "systemd-nspawn .*--machine=$MACHINE" || true); do
        kill -TERM "$pid" 2>/dev/null || true
    done
    if [[ -n $RUN && $RUN == "$CACHE"/run.* ]]; then
        rm -rf --one-file-system "$RUN"
    fi
    RUN=
    remove_new_cgroups
}

# shellcheck disable=SC2317 # run by the EXIT trap
on_exit() {
    local status=$?
    teardown
    [[ -n ${HOST_BEFORE:-} ]] && rm -f "$HOST_BEFORE" "$CGROUPS_BEFORE"
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

HOST_BEFORE=$(mktemp)
CGROUPS_BEFORE=$(mktemp)
host_state >"$HOST_BEFORE"
find /sys/fs/cgroup -mindepth 1 -type d \( -name payload -o -name supervisor \) 2>/dev/null | sort >"$CGROUPS_BEFORE"

# --- the cached root, wheels and Home Assistant venv -------------------------------------------

ROOT_CACHE=$CACHE/$SUITE-amd64
RECIPE="debootstrap --variant=minbase --include=$INCLUDE $SUITE"
KEY=$(echo "$HA_REQUIREMENTS" | sha256sum | cut -c1-12)
WHEELS=$CACHE/wheels-$KEY
VENV=$CACHE/venv-$KEY # bound at /opt/ha in the root: its python links to the root's python3

build_root() {
    if [[ -f $ROOT_CACHE.recipe && $(cat "$ROOT_CACHE.recipe") == "$RECIPE" && -x $ROOT_CACHE/usr/bin/python3 ]]; then
        say "reusing the root $ROOT_CACHE ($(du -sh "$ROOT_CACHE" | cut -f1))"
        return
    fi
    local t0=$SECONDS
    say "building the root $ROOT_CACHE: $RECIPE (~2 min)"
    rm -rf "$ROOT_CACHE" "$ROOT_CACHE.partial" "$ROOT_CACHE.recipe"
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOT_CACHE.partial" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1 || die "debootstrap failed (log: $CACHE/debootstrap.log)"
    rm -rf "$ROOT_CACHE.partial/var/cache/apt/archives/"*.deb
    # Mount points for the read-only root: Home Assistant's venv and its configuration.
    mkdir -p "$ROOT_CACHE.partial/opt/ha" "$ROOT_CACHE.partial/config"
    mv "$ROOT_CACHE.partial" "$ROOT_CACHE"
    echo "$RECIPE" >"$ROOT_CACHE.recipe"
    say "root built in $((SECONDS - t0)) s ($(du -sh "$ROOT_CACHE" | cut -f1))"
}

in_root() { # in_root online|offline NSPAWN-ARGS... COMMAND: a command in the root, nothing registered
    local net=(--private-network --resolv-conf=off)
    [[ $1 == online ]] && net=(--resolv-conf=copy-host)
    shift
    systemd-nspawn --quiet --register=no --keep-unit --machine="$MACHINE-prepare" -D "$ROOT_CACHE" \
        "${net[@]}" --timezone=off --link-journal=no "$@"
}

build_venv() {
    if [[ -f $VENV/.complete ]]; then
        say "reusing Home Assistant $HA_VERSION in $VENV ($(du -sh "$VENV" | cut -f1))"
        return
    fi
    local t0=$SECONDS
    mkdir -p "$WHEELS"
    if [[ ! -f $WHEELS/.complete ]]; then
        say "downloading Home Assistant $HA_VERSION and its integrations' wheels into $WHEELS (PyPI)"
        # The root's pip fetches (with the host's CA bundle, for a host behind a TLS-inspecting
        # proxy) and builds the few sdists (lru-dict has no cp313 wheel) with the root's gcc;
        # the install below is then offline.
        local ca=${SERENBOX_HA_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
        [[ -f $ca ]] || die "no CA bundle at $ca (set SERENBOX_HA_CA_BUNDLE)"
        rm -rf "$VENV.partial" && mkdir -p "$VENV.partial"
        in_root online --bind-ro="$ca:/etc/ha-check-ca.crt" \
            --setenv=PIP_CERT=/etc/ha-check-ca.crt --bind="$WHEELS:/wheels" --bind="$VENV.partial:/opt/ha" sh -ec "
            python3 -m venv /opt/ha
            /opt/ha/bin/pip --disable-pip-version-check --no-cache-dir -q wheel -w /wheels $HA_REQUIREMENTS
        " >"$CACHE/pip-download.log" 2>&1 || die "pip download failed (log: $CACHE/pip-download.log)"
        touch "$WHEELS/.complete"
        say "wheels downloaded in $((SECONDS - t0)) s ($(du -sh "$WHEELS" | cut -f1))"
    fi
    t0=$SECONDS
    rm -rf "$VENV.partial" && mkdir -p "$VENV.partial"
    in_root offline --bind-ro="$WHEELS:/wheels" --bind="$VENV.partial:/opt/ha" sh -ec "
        python3 -m venv /opt/ha
        /opt/ha/bin/pip --disable-pip-version-check -q install --no-index --find-links /wheels $HA_REQUIREMENTS
    " >"$CACHE/pip-install.log" 2>&1 || die "pip install (offline, from $WHEELS) failed (log: $CACHE/pip-install.log)"
    mv "$VENV.partial" "$VENV"
    touch "$VENV/.complete"
    # Venvs for other requirements are not needed again.
    find "$CACHE" -mindepth 1 -maxdepth 1 \( -name 'venv-*' ! -path "$VENV" -o -name 'wheels-*' ! -path "$WHEELS" \) \
        -exec rm -rf {} +
    say "Home Assistant installed offline in $((SECONDS - t0)) s ($(du -sh "$VENV" | cut -f1))"
}

mkdir -p "$CACHE"
build_root
build_venv
if ((PREPARE_ONLY)); then
    say "prepared: $ROOT_CACHE, $VENV"
    exit 0
fi

# --- the checks (tests/ha/check.py) ------------------------------------------------------------

RUN=$(mktemp -d "$CACHE/run.XXXXXX")
status=0
# A network namespace of its own with only loopback: the broker, Home Assistant (nspawn shares the
# caller's network), the daemon and the checks all meet on its 127.0.0.1, and nothing Home
# Assistant opens reaches the host's network (with no interface but lo, its analytics integration
# fails to set up, logged as an ERROR; nothing here needs it). The namespace goes away with its
# last process.
unshare --net -- sh -ec 'ip link set lo up && exec "$@"' sh \
    env PYTHONPATH="$SRC" "$PYTHON" -m tests.ha.check --root "$ROOT_CACHE" --venv "$VENV" --machine "$MACHINE" \
    --workdir "$RUN" || status=$?
# Home Assistant's log (.1: its first start, before the restart check), kept after the run is gone.
for log in home-assistant.log home-assistant.log.1; do
    cp "$RUN/ha-config/$log" "$CACHE/last-$log" 2>/dev/null || true
done
((status <= 1)) || die "the check driver failed (exit $status)"

teardown
after=$(host_state)
diff=$(diff "$HOST_BEFORE" <(echo "$after") | grep '^[<>]' | head -n 5 | tr '\n' ';' || true)
if [[ -z $diff ]]; then
    echo "ok    host left as found: no container, process, mount, cgroup; host files unchanged"
else
    echo "FAIL  host left as found: $diff"
    status=1
fi
say "done in $((SECONDS - START_S)) s"
exit "$status"
