#!/usr/bin/env bash
# Remove what scripts/install-service.sh installed.
#
#   sudo ./scripts/uninstall-service.sh            # stop, disable, remove binaries/units/rules; keep config and state
#   sudo ./scripts/uninstall-service.sh --purge    # ... and delete configuration, state and the scope rule
#
# Honours the same PREFIX/DESTDIR and --server/--client/--all as the installer
# (default: both roles, whatever is present). Safe to run again. Users and groups
# are kept (files may still belong to them); the commands to delete them are printed.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $0 [--server | --client | --all] [--purge] [--prefix DIR] [--destdir DIR]

  --server / --client / --all   which role to remove (default: --all)
  --purge                       also delete the configuration (/etc/p2p-usb), the agent
                                state (/var/lib/p2p-usb: identity key, approvals) and
                                the scope rule /etc/udev/rules.d/69-p2p-usb-scope.rules
  --prefix DIR                  the prefix used at install time (default: \$PREFIX or /usr/local)
  --destdir DIR                 remove from a staged tree (default: \$DESTDIR)
EOF
}

ROLE_SERVER=1
ROLE_CLIENT=1
PURGE=0
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}

while [ $# -gt 0 ]; do
    case "$1" in
        --server) ROLE_SERVER=1; ROLE_CLIENT=0 ;;
        --client) ROLE_SERVER=0; ROLE_CLIENT=1 ;;
        --all) ROLE_SERVER=1; ROLE_CLIENT=1 ;;
        --purge) PURGE=1 ;;
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
. "$(dirname "${BASH_SOURCE[0]}")/install-layout.sh"

if [ "$LIVE" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
    echo "error: needs root (run with sudo), or set DESTDIR" >&2
    exit 1
fi
if [ "$LIVE" -eq 1 ] && command -v dpkg-query >/dev/null 2>&1 \
    && dpkg-query -S "$BINDIR/p2p-usb-agent" >/dev/null 2>&1; then
    warn "$BINDIR/p2p-usb-agent belongs to a Debian package; prefer: sudo apt remove p2p-usb (or purge)"
fi

rmf() { # remove files below DESTDIR, quietly if absent
    local f
    for f in "$@"; do
        if [ -e "$DESTDIR$f" ] || [ -L "$DESTDIR$f" ]; then
            rm -f "$DESTDIR$f"
            say "  removed   $f"
        fi
    done
}

# --- stop and disable while the unit files still exist --------------------
if [ "$ROLE_SERVER" -eq 1 ] && [ "$LIVE" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    if [ -d /run/systemd/system ]; then
        # Running instances of the templates, whatever their names.
        mapfile -t running < <(systemctl list-units --all --plain --no-legend \
            'p2p-usb-server@*.target' 'p2p-usb-helper@*.socket' 'p2p-usb-helper@*.service' \
            'p2p-usb-agent@*.service' 2>/dev/null | awk '{ print ($1 == "●") ? $2 : $1 }')
        systemctl stop p2p-usb-server.target p2p-usb-agent.service p2p-usb-helper.service \
            p2p-usb-helper.socket "${running[@]}" 2>/dev/null || true
    fi
    # Enabled instances are symlinks in some *.wants directory below /etc.
    mapfile -t enabled < <(find /etc/systemd/system -path '*.wants/*' -type l \
        \( -name 'p2p-usb-server@?*.target' -o -name 'p2p-usb-helper@?*.socket' \
           -o -name 'p2p-usb-agent@?*.service' \) -printf '%f\n' 2>/dev/null | sort -u)
    systemctl disable p2p-usb-server.target p2p-usb-helper.socket p2p-usb-agent.service \
        "${enabled[@]}" >/dev/null 2>&1 || true
    say "  stopped and disabled p2p-usb-server.target, its units and instances (${#enabled[@]} enabled instance units)"
fi

# --- files ----------------------------------------------------------------
if [ "$ROLE_SERVER" -eq 1 ]; then
    for u in "${SERVER_UNITS[@]}"; do rmf "$UNITDIR/$u"; done
    for b in "${SERVER_BINS[@]}"; do rmf "$BINDIR/$b"; done
    rmf "$UDEVRULESDIR/70-p2p-usb-helper.rules" \
        "$SYSUSERSDIR/p2p-usb-server.conf" "$TMPFILESDIR/p2p-usb.conf" \
        "$DOCDIR/examples/server.toml" "$DOCDIR/examples/69-p2p-usb-scope.rules.example"
fi
if [ "$ROLE_CLIENT" -eq 1 ]; then
    for b in "${CLIENT_BINS[@]}"; do rmf "$BINDIR/$b"; done
    rmf "$UDEVRULESDIR/70-p2p-usb-vhci.rules" \
        "$SYSUSERSDIR/p2p-usb-client.conf" "$MODULESLOADDIR/p2p-usb-vhci.conf" \
        "$DOCDIR/examples/client.toml"
fi
if [ "$ROLE_SERVER" -eq 1 ] && [ "$ROLE_CLIENT" -eq 1 ]; then
    rmf "$DOCDIR/SYSTEMD.md"
    rmdir "$DESTDIR$DOCDIR/examples" "$DESTDIR$DOCDIR" 2>/dev/null || true
fi

# The scope rule is the administrator's own file (copied from the example).
SCOPE_RULE=/etc/udev/rules.d/69-p2p-usb-scope.rules
if [ "$PURGE" -eq 1 ]; then
    if [ "$ROLE_SERVER" -eq 1 ]; then
        rm -rf "$DESTDIR/var/lib/p2p-usb" "$DESTDIR/run/p2p-usb" "$DESTDIR/run/p2p-usb-agent"
        rm -f "$DESTDIR$CONFDIR"/server.toml "$DESTDIR$CONFDIR"/server-*.toml "$DESTDIR$SCOPE_RULE"
        say "  purged    /var/lib/p2p-usb (identity key, approvals), /etc/p2p-usb/server*.toml and $SCOPE_RULE"
    fi
    if [ "$ROLE_CLIENT" -eq 1 ]; then
        rm -f "$DESTDIR$CONFDIR/client.toml"
        say "  purged    /etc/p2p-usb/client.toml (per-user ~/.config/p2p-usb and keys are left alone)"
    fi
    rmdir "$DESTDIR$CONFDIR" 2>/dev/null ||
        { [ -d "$DESTDIR$CONFDIR" ] && say "  kept      $CONFDIR, not empty:$(find "$DESTDIR$CONFDIR" -mindepth 1 -maxdepth 1 -printf ' %f')"; }
elif [ "$ROLE_SERVER" -eq 1 ] && [ -e "$DESTDIR$SCOPE_RULE" ]; then
    say "  kept      $SCOPE_RULE (yours; --purge deletes it)"
fi

# --- reload ---------------------------------------------------------------
if [ "$LIVE" -eq 1 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl reset-failed 'p2p-usb-*' 2>/dev/null || true
    fi
    if command -v udevadm >/dev/null 2>&1 && udevadm control --ping >/dev/null 2>&1; then
        udevadm control --reload-rules
        [ "$ROLE_SERVER" -eq 1 ] && { udevadm trigger --subsystem-match=usb --action=change || true; }
    fi
    say ""
    say "Uninstalled.$([ "$PURGE" -eq 0 ] && echo " Configuration in /etc/p2p-usb and state in /var/lib/p2p-usb were kept (use --purge to delete them).")"
    say "Users and groups were kept; to delete them:"
    [ "$ROLE_SERVER" -eq 1 ] && say "  sudo userdel p2p-usb; sudo userdel p2p-usb-helper; sudo groupdel usb-proxy; sudo groupdel p2p-usb-admin"
    [ "$ROLE_CLIENT" -eq 1 ] && say "  sudo groupdel p2p-usb-attach"
fi
exit 0
