# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# Where scripts/install-service.sh puts files and scripts/uninstall-service.sh
# looks for them, defined once so the two cannot drift apart. Sourced (not
# run) after both have read PREFIX and DESTDIR from the command line.

PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || PREFIX=/usr
DESTDIR=${DESTDIR%/}

BINDIR=$PREFIX/bin
# With /usr, the distribution layout below /usr/lib; otherwise the local
# administrator's layout below /etc.
if [ "$PREFIX" = /usr ]; then
    LIBBASE=/usr/lib
    UNITDIR=${UNITDIR:-/usr/lib/systemd/system}
else
    LIBBASE=/etc
    UNITDIR=${UNITDIR:-/etc/systemd/system}
fi
UDEVRULESDIR=${UDEVRULESDIR:-$LIBBASE/udev/rules.d}
SYSUSERSDIR=${SYSUSERSDIR:-$LIBBASE/sysusers.d}
TMPFILESDIR=${TMPFILESDIR:-$LIBBASE/tmpfiles.d}
MODULESLOADDIR=${MODULESLOADDIR:-$LIBBASE/modules-load.d}
DOCDIR=${DOCDIR:-$PREFIX/share/doc/p2p-usb}
CONFDIR=/etc/p2p-usb

SERVER_BINS=(p2p-usb-helper p2p-usb-agent)
CLIENT_BINS=(p2p-usb)
SERVER_UNITS=(
    p2p-usb-server.target p2p-usb-helper.socket p2p-usb-helper.service p2p-usb-agent.service
    p2p-usb-server@.target p2p-usb-helper@.socket p2p-usb-helper@.service p2p-usb-agent@.service
)

# Without DESTDIR the running system is changed (users, reloads, services).
LIVE=0
[ -z "$DESTDIR" ] && LIVE=1

say() { printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
