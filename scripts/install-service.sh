#!/usr/bin/env bash
# Install p2p-usb as systemd services (server role) and/or the client pieces.
#
#   sudo ./scripts/install-service.sh                 # server: helper + agent, units, udev, users
#   sudo ./scripts/install-service.sh --client        # client: p2p-usb, vhci udev rule, group p2p-usb-attach
#   sudo ./scripts/install-service.sh --all           # both
#   DESTDIR=/tmp/stage PREFIX=/usr ./scripts/install-service.sh --all   # staging tree for a package
#
# Safe to run again: binaries, units and rules are replaced, an existing
# /etc/p2p-usb/*.toml is never touched, users are created only if missing.
# See docs/SYSTEMD.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $0 [--server | --client | --all] [--bin-dir DIR] [--prefix DIR] [--destdir DIR]

  --server        install the server role (default): p2p-usb-helper, p2p-usb-agent,
                  the systemd units, the USB udev rule, users and groups
  --client        install the client role: p2p-usb, the vhci_hcd udev rule,
                  modules-load.d for vhci-hcd, group p2p-usb-attach
  --all           both roles
  --bin-dir DIR   where the built binaries are (default: \$BIN_DIR or target/release)
  --prefix DIR    installation prefix (default: \$PREFIX or /usr/local); with /usr the
                  units, rules, sysusers.d and tmpfiles.d files go below /usr/lib
                  (distribution layout), otherwise below /etc (local admin layout)
  --destdir DIR   stage everything below DIR (default: \$DESTDIR); nothing on the
                  running system is changed then (no users, no reloads)

Environment overrides for single directories: UNITDIR, UDEVRULESDIR, SYSUSERSDIR,
TMPFILESDIR, MODULESLOADDIR, DOCDIR.
EOF
}

ROLE_SERVER=1
ROLE_CLIENT=0
BIN_DIR=${BIN_DIR:-$REPO/target/release}
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}

while [ $# -gt 0 ]; do
    case "$1" in
        --server) ROLE_SERVER=1; ROLE_CLIENT=0 ;;
        --client) ROLE_SERVER=0; ROLE_CLIENT=1 ;;
        --all) ROLE_SERVER=1; ROLE_CLIENT=1 ;;
        --bin-dir) BIN_DIR=${2:?--bin-dir needs a directory}; shift ;;
        --bin-dir=*) BIN_DIR=${1#*=} ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --destdir) DESTDIR=${2:?--destdir needs a directory}; shift ;;
        --destdir=*) DESTDIR=${1#*=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=scripts/install-layout.sh
. "$REPO/scripts/install-layout.sh"
SYSTEMD_RUNNING=0
[ -d /run/systemd/system ] && SYSTEMD_RUNNING=1

# Ownership is only set when we can (root); a package build fixes it with --root-owner-group.
OWNER=()
[ "$(id -u)" -eq 0 ] && OWNER=(-o root -g root)

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if [ "$LIVE" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
    die "installing into the running system needs root (run with sudo), or set DESTDIR to stage the files"
fi

# Check every binary first so a failed run changes nothing.
BINS=()
[ "$ROLE_SERVER" -eq 1 ] && BINS+=("${SERVER_BINS[@]}")
[ "$ROLE_CLIENT" -eq 1 ] && BINS+=("${CLIENT_BINS[@]}")
missing=()
for b in "${BINS[@]}"; do
    [ -x "$BIN_DIR/$b" ] || missing+=("$b")
done
if [ "${#missing[@]}" -gt 0 ]; then
    die "not found or not executable in $BIN_DIR: ${missing[*]} (build with: cargo build --release, or pass --bin-dir DIR)"
fi

for f in packaging/sysusers.d/p2p-usb-server.conf packaging/sysusers.d/p2p-usb-client.conf \
    packaging/tmpfiles.d/p2p-usb.conf packaging/modules-load.d/p2p-usb-vhci.conf \
    systemd/p2p-usb-agent.service udev/70-p2p-usb-helper.rules examples/server.toml; do
    [ -f "$REPO/$f" ] || die "$REPO/$f is missing: this script needs the systemd/, udev/, packaging/ and examples/ directories of the repository"
done

dir() { install -d -m "$1" "${OWNER[@]}" "$DESTDIR$2"; }
file() { install -m "$1" "${OWNER[@]}" "$2" "$DESTDIR$3"; }

say "Installing p2p-usb (roles:$([ "$ROLE_SERVER" -eq 1 ] && echo ' server')$([ "$ROLE_CLIENT" -eq 1 ] && echo ' client')) into ${DESTDIR:-/} with prefix $PREFIX"

# --- binaries -------------------------------------------------------------
# The release profile keeps debug info for profiling; installed copies are
# stripped (about 7 times smaller), as a distribution would ship them.
STRIP=()
if command -v strip >/dev/null; then STRIP=(-s); fi
dir 0755 "$BINDIR"
for b in "${BINS[@]}"; do
    install -m 0755 "${STRIP[@]}" "${OWNER[@]}" "$BIN_DIR/$b" "$DESTDIR$BINDIR/$b"
    say "  binary    $BINDIR/$b"
done

# --- documentation and pristine examples ----------------------------------
dir 0755 "$DOCDIR"
dir 0755 "$DOCDIR/examples"
if [ -f "$REPO/docs/SYSTEMD.md" ]; then
    file 0644 "$REPO/docs/SYSTEMD.md" "$DOCDIR/SYSTEMD.md"
else
    warn "docs/SYSTEMD.md not found next to the scripts; documentation not installed"
fi
file 0644 "$REPO/examples/server.toml" "$DOCDIR/examples/server.toml"
file 0644 "$REPO/examples/client.toml" "$DOCDIR/examples/client.toml"

# --- configuration: never overwrite ---------------------------------------
install_config() { # mode source target
    local mode=$1 src=$2 dst=$3
    if [ -e "$DESTDIR$dst" ]; then
        say "  config    $dst exists, left unchanged (new example: $DOCDIR/examples/$(basename "$src"))"
        if [ "$mode" = 0600 ] && [ -n "$(find "$DESTDIR$dst" -perm /0077 2>/dev/null)" ]; then
            warn "$dst is readable by others; consider: chmod 600 $dst"
        fi
    else
        file "$mode" "$src" "$dst"
        say "  config    $dst (mode $mode)"
    fi
}
dir 0755 "$CONFDIR"

if [ "$ROLE_SERVER" -eq 1 ]; then
    install_config 0600 "$REPO/examples/server.toml" "$CONFDIR/server.toml"

    # --- systemd units: ExecStart follows the binary directory -------------
    dir 0755 "$UNITDIR"
    for u in "${SERVER_UNITS[@]}"; do
        tmp=$(mktemp)
        sed "s|/usr/local/bin/|$BINDIR/|g" "$REPO/systemd/$u" >"$tmp"
        file 0644 "$tmp" "$UNITDIR/$u"
        rm -f "$tmp"
        say "  unit      $UNITDIR/$u"
    done

    dir 0755 "$UDEVRULESDIR"
    file 0644 "$REPO/udev/70-p2p-usb-helper.rules" "$UDEVRULESDIR/70-p2p-usb-helper.rules"
    file 0644 "$REPO/udev/69-p2p-usb-scope.rules.example" "$DOCDIR/examples/69-p2p-usb-scope.rules.example"
    say "  udev      $UDEVRULESDIR/70-p2p-usb-helper.rules"

    dir 0755 "$SYSUSERSDIR"
    file 0644 "$REPO/packaging/sysusers.d/p2p-usb-server.conf" "$SYSUSERSDIR/p2p-usb-server.conf"
    dir 0755 "$TMPFILESDIR"
    file 0644 "$REPO/packaging/tmpfiles.d/p2p-usb.conf" "$TMPFILESDIR/p2p-usb.conf"
    say "  sysusers  $SYSUSERSDIR/p2p-usb-server.conf"
    say "  tmpfiles  $TMPFILESDIR/p2p-usb.conf"
fi

if [ "$ROLE_CLIENT" -eq 1 ]; then
    install_config 0644 "$REPO/examples/client.toml" "$CONFDIR/client.toml"
    dir 0755 "$UDEVRULESDIR"
    file 0644 "$REPO/udev/70-p2p-usb-vhci.rules" "$UDEVRULESDIR/70-p2p-usb-vhci.rules"
    say "  udev      $UDEVRULESDIR/70-p2p-usb-vhci.rules"
    dir 0755 "$SYSUSERSDIR"
    file 0644 "$REPO/packaging/sysusers.d/p2p-usb-client.conf" "$SYSUSERSDIR/p2p-usb-client.conf"
    say "  sysusers  $SYSUSERSDIR/p2p-usb-client.conf"
    dir 0755 "$MODULESLOADDIR"
    file 0644 "$REPO/packaging/modules-load.d/p2p-usb-vhci.conf" "$MODULESLOADDIR/p2p-usb-vhci.conf"
    say "  modules   $MODULESLOADDIR/p2p-usb-vhci.conf"
fi

# --- activate on the running system ---------------------------------------
if [ "$LIVE" -eq 1 ]; then
    # systemd-sysusers only edits /etc/passwd and /etc/group; it does not need a
    # running systemd, and the socket unit and udev rules need the names to exist.
    if command -v systemd-sysusers >/dev/null 2>&1; then
        confs=()
        [ "$ROLE_SERVER" -eq 1 ] && confs+=("$SYSUSERSDIR/p2p-usb-server.conf")
        [ "$ROLE_CLIENT" -eq 1 ] && confs+=("$SYSUSERSDIR/p2p-usb-client.conf")
        systemd-sysusers "${confs[@]}"
        say "  users     created or already present (systemd-sysusers)"
    else
        warn "systemd-sysusers not found: create the users and groups listed in $SYSUSERSDIR by hand"
    fi
    if [ "$SYSTEMD_RUNNING" -eq 1 ]; then
        [ "$ROLE_SERVER" -eq 1 ] && systemd-tmpfiles --create "$TMPFILESDIR/p2p-usb.conf"
        systemctl daemon-reload
        say "  systemd   daemon reloaded"
    else
        say "  systemd   not running: skipped daemon-reload and tmpfiles (both happen at next boot)"
    fi
    if command -v udevadm >/dev/null 2>&1 && udevadm control --ping >/dev/null 2>&1; then
        udevadm control --reload-rules
        if [ "$ROLE_SERVER" -eq 1 ]; then
            udevadm trigger --subsystem-match=usb --action=change || warn "udevadm trigger (usb) failed"
        fi
        if [ "$ROLE_CLIENT" -eq 1 ]; then
            # Loading the module fires the "bind" event the rule waits for; if it was
            # already loaded, re-run the rule on the existing controller.
            if ! modprobe vhci-hcd 2>/dev/null; then
                warn "could not load vhci-hcd (it is loaded at next boot via modules-load.d)"
            fi
            udevadm trigger --subsystem-match=platform --sysname-match='vhci_hcd.*' --action=change \
                || warn "udevadm trigger (vhci_hcd) failed"
        fi
        # Return with the rules applied, not just queued.
        udevadm settle --timeout=30 || warn "udevadm settle timed out; the rules apply shortly"
        say "  udev      rules reloaded and applied"
    else
        say "  udev      udevd not running: rules apply at next boot"
    fi
fi

# --- leftovers of the single-unit design -----------------------------------
if [ "$ROLE_SERVER" -eq 1 ]; then
    for old in /etc/systemd/system/p2p-usb-server.service /usr/local/bin/p2p-usb-server \
        /etc/udev/rules.d/99-p2p-usb.rules; do
        if [ -e "$DESTDIR$old" ]; then
            warn "found $old of the single-unit design: remove it (docs/SYSTEMD.md, \"Migrating from the single-unit service\")"
        fi
    done
fi

# --- next steps -----------------------------------------------------------
if [ "$LIVE" -eq 1 ]; then
    say ""
    say "Done. Next steps:"
    if [ "$ROLE_SERVER" -eq 1 ]; then
        cat <<EOF
  Server:
    1. Say which devices may be shared ([[helper.share]]) and who may connect:
         sudo editor $CONFDIR/server.toml
    2. Start now and at every boot (socket, helper and agent together):
         sudo systemctl enable --now p2p-usb-server.target
    3. Find this server's NodeId (clients pin it):
         journalctl -u p2p-usb-agent | grep NodeId      (or: sudo p2p-usb-agent id)
    4. Let an admin approve clients without sudo (log in again afterwards):
         sudo usermod -aG p2p-usb-admin \$USER
    Status: systemctl status p2p-usb-server.target p2p-usb-helper.service p2p-usb-agent.service
    After reinstalling binaries: sudo systemctl restart p2p-usb-server.target
EOF
    fi
    if [ "$ROLE_CLIENT" -eq 1 ]; then
        cat <<EOF
  Client:
    1. Allow your user to attach devices without root (log in again afterwards):
         sudo usermod -aG p2p-usb-attach \$USER
    2. Print your client id and send it to the server's admin:  p2p-usb id
    3. Pin the server in ~/.config/p2p-usb/client.toml (example: $DOCDIR/examples/client.toml),
       then:  p2p-usb list SERVER ;  p2p-usb attach SERVER DEVICE
EOF
    fi
    say "  Documentation: $DOCDIR/SYSTEMD.md"
else
    say "Staged into $DESTDIR (no users created, nothing reloaded)."
fi
