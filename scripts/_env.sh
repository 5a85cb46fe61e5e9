# shellcheck shell=bash
# Sourced by scripts/demo, scripts/test and scripts/bench (not run on its own).
#
# It moves to the repository root, makes sure the Debian packages a script needs are installed
# (installing them when running as root), and creates or reuses .venv, reinstalling the project
# only when pyproject.toml changed since the last install. After sourcing, FV_ROOT is the repo root,
# FV_VENV the virtualenv and FV_BIN its bin directory, FV_GUEST_DIR the directory of the test guests
# (scripts/build-guests writes there, tests and benches read there; set it to move them), and the
# cwd is FV_ROOT.

FV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FV_VENV="$FV_ROOT/.venv"
FV_BIN="$FV_VENV/bin"
# The same default as scripts/build-guests and tests/support/qemu.py (guest_dir).
FV_GUEST_DIR="${FV_GUEST_DIR:-$FV_ROOT/.cache/guests}"
export FV_ROOT FV_VENV FV_BIN FV_GUEST_DIR
cd "$FV_ROOT"

# Debian packages the scripts need, as "package:probe". The probe tells a non-Debian machine that the
# tool is there anyway: a binary on PATH, a /path/glob, or static:BINARY for a binary on PATH that
# must be statically linked. This is the one place to add more (qemu-system-x86:qemu-system-x86_64,
# ...); tests/test_scripts.py pins the entries the tests cannot do without.
# shellcheck disable=SC2034  # read by fv_ensure_system_packages through a nameref
FV_PACKAGES_TEST=(
    "mosquitto:mosquitto"
    "mosquitto-clients:mosquitto_pub"
    "qemu-system-x86:qemu-system-x86_64"
    "qemu-utils:qemu-img"
    "busybox-static:static:busybox"
    "linux-image-amd64:/boot/vmlinuz-*"
    "cpio:cpio"
    "binutils:ld"
    "openipmi:ipmi_sim"
    "ipmitool:ipmitool"
    "iproute2:ip"
    "zsh:zsh"
)
# shellcheck disable=SC2034
FV_PACKAGES_BENCH=("${FV_PACKAGES_TEST[@]}")

fv_say() { printf 'fleetvisor: %s\n' "$*" >&2; }
fv_die() { fv_say "error: $*"; exit 1; }

# Milliseconds since the epoch, for step timings.
fv_now_ms() { date +%s%3N; }
fv_elapsed() { # START_MS -> "1.234s"
    local ms=$(( $(fv_now_ms) - $1 ))
    printf '%d.%03ds' $((ms / 1000)) $((ms % 1000))
}

# Run a command quietly; on failure show what it printed and return its status.
fv_quiet() {
    local log status=0
    log="$(mktemp "${TMPDIR:-/tmp}/fleetvisor-env.XXXXXX")"
    "$@" >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        fv_say "command failed (exit $status): $*"
        cat "$log" >&2
    fi
    rm -f "$log"
    return "$status"
}

# Whether BINARY is on PATH and statically linked (ldd refuses it: "not a dynamic executable").
fv_have_static_binary() { # BINARY
    local path
    path="$(command -v "$1" 2>/dev/null)" || return 1
    command -v ldd >/dev/null 2>&1 || return 1 # cannot tell: say missing rather than guess
    ! ldd "$path" >/dev/null 2>&1
}

# Whether PACKAGE is installed, by dpkg's own status, else by its probe (see FV_PACKAGES_TEST).
#
# busybox-static is the case the probe must get right. Debian's busybox and busybox-static conflict
# and both install /bin/busybox, so "a busybox on PATH" also holds for the dynamic one, which cannot
# run alone in the guest's initramfs (scripts/build-guests refuses it). dpkg's status of
# busybox-static is exact on Debian but says nothing elsewhere, and a busybox from anywhere else
# serves as well if it is static. So the probe checks what the build needs, the binary being static,
# and dpkg's "installed" for busybox-static itself is the other way to pass.
fv_have_package() { # PACKAGE PROBE
    local status
    if command -v dpkg-query >/dev/null 2>&1; then
        status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)"
        [ "$status" = "install ok installed" ] && return 0
    fi
    case "$2" in
        /*) compgen -G "$2" >/dev/null ;; # a file the package installs, e.g. /boot/vmlinuz-*
        static:*) fv_have_static_binary "${2#static:}" ;;
        *) PATH="$PATH:/usr/sbin:/usr/local/sbin:/sbin" command -v "$2" >/dev/null 2>&1 ;;
    esac
}

# fv_ensure_system_packages LISTNAME: install the missing packages of the named list when root;
# otherwise say what is missing and how to get it, and carry on (tests that need it skip).
# Under CI (CI=true) a package that is still missing is fatal, whether the install failed or there
# was no root to install it: a green CI run cannot hide tests that skipped (and the tests themselves
# fail instead of skipping there, see tests/support/needs.py).
fv_ensure_system_packages() {
    local -n fv_wanted="$1"
    local entry missing=()
    for entry in "${fv_wanted[@]}"; do
        fv_have_package "${entry%%:*}" "${entry#*:}" || missing+=("${entry%%:*}")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        if [ "${CI:-}" = "true" ]; then
            fv_die "missing Debian package(s) under CI: ${missing[*]}; run as root to install them, or install them first: apt-get install -y ${missing[*]}"
        fi
        fv_say "missing Debian package(s): ${missing[*]} (tests that need them will be skipped);"
        fv_say "install them with: sudo apt-get update && sudo apt-get install -y ${missing[*]}"
        return 0
    fi
    fv_say "installing Debian package(s): ${missing[*]}"
    if ! fv_quiet apt-get update -qq ||
        ! fv_quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
        if [ "${CI:-}" = "true" ]; then
            fv_die "could not install ${missing[*]}; see the apt output above"
        fi
        fv_say "could not install ${missing[*]}; tests that need them will be skipped"
    fi
    return 0
}

fv_python_ok() { [ -x "$FV_BIN/python" ] && "$FV_BIN/python" -c 'import sys' >/dev/null 2>&1; }

# Create or reuse .venv and install the project (editable, with dev extras) when pyproject.toml
# changed since the last install. A lock keeps two scripts started together from both installing.
fv_ensure_venv() {
    local stamp="$FV_VENV/.fleetvisor-install-stamp" want lock
    lock="${TMPDIR:-/tmp}/fleetvisor-venv-$(id -u)-$(printf '%s' "$FV_ROOT" | sha256sum | cut -c1-12).lock"
    if command -v flock >/dev/null 2>&1 && { exec 9>>"$lock"; } 2>/dev/null; then
        flock 9
    fi
    if ! fv_python_ok; then
        # Never delete a venv here: it may belong to another user or be in use by another script.
        if [ -e "$FV_VENV" ]; then
            fv_die "$FV_BIN/python exists but does not run (moved, or built by another user's Python); remove $FV_VENV and rerun"
        fi
        command -v python3 >/dev/null 2>&1 || fv_die "python3 not found; install Python 3.11 or newer"
        fv_say "creating $FV_VENV"
        if ! fv_quiet python3 -m venv "$FV_VENV"; then
            [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 ||
                fv_die "python3 -m venv failed; on Debian install python3-venv (sudo apt-get install -y python3-venv)"
            rm -rf "$FV_VENV" # the half-made venv this run just failed to create
            fv_quiet apt-get update -qq &&
                fv_quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv &&
                fv_quiet python3 -m venv "$FV_VENV" || fv_die "could not create $FV_VENV"
        fi
    fi
    want="$(sha256sum <pyproject.toml | cut -d' ' -f1) $("$FV_BIN/python" -c 'import sys; print(sys.version.split()[0])')"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        fv_say "installing the project into .venv (pyproject.toml changed or first run)"
        fv_quiet "$FV_BIN/python" -m pip install --disable-pip-version-check -q -e '.[dev]' ||
            fv_die "pip install -e '.[dev]' failed; see the output above"
        printf '%s\n' "$want" >"$stamp"
    fi
    # The braces matter: a bare `exec 9>&- 2>/dev/null` would send all later stderr to /dev/null.
    { exec 9>&-; } 2>/dev/null || true
    export VIRTUAL_ENV="$FV_VENV"
    export PATH="$FV_BIN:$PATH"
}
