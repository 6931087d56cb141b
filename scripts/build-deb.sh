#!/usr/bin/env bash
# Build a Debian package of p2p-usb (server and client roles) with plain dpkg-deb:
# the tree comes from scripts/install-service.sh --all with DESTDIR and PREFIX=/usr,
# the maintainer scripts from packaging/debian/.
#
#   ./scripts/build-deb.sh [--bin-dir DIR] [--out DIR] [--version V] [--arch A]
#
# Prints the package's control data and contents; the path of the .deb is the
# last line of output.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BIN_DIR:-$REPO/target/release}
OUT_DIR=$REPO/target/debian
VERSION=
ARCH=

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) BIN_DIR=${2:?}; shift ;;
        --bin-dir=*) BIN_DIR=${1#*=} ;;
        --out) OUT_DIR=${2:?}; shift ;;
        --out=*) OUT_DIR=${1#*=} ;;
        --version) VERSION=${2:?}; shift ;;
        --version=*) VERSION=${1#*=} ;;
        --arch) ARCH=${2:?}; shift ;;
        --arch=*) ARCH=${1#*=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

command -v dpkg-deb >/dev/null || { echo "error: dpkg-deb not found (apt-get install dpkg)" >&2; exit 1; }

if [ -z "$VERSION" ]; then
    # version = "x.y.z" of [workspace.package] in Cargo.toml
    VERSION=$(awk '/^\[workspace.package\]/{p=1; next} /^\[/{p=0} p && $1 == "version" {gsub(/"/, "", $3); print $3; exit}' "$REPO/Cargo.toml")
fi
[ -n "$VERSION" ] || { echo "error: cannot read the version from Cargo.toml; pass --version" >&2; exit 1; }
[ -n "$ARCH" ] || ARCH=$(dpkg --print-architecture)

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
ROOT=$STAGE/root

DESTDIR=$ROOT PREFIX=/usr "$REPO/scripts/install-service.sh" --all --bin-dir "$BIN_DIR" >/dev/null

# Debian wants a copyright file next to the docs.
cat >"$ROOT/usr/share/doc/p2p-usb/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: p2p-usb
Source: https://github.com/p2p-usb/p2p-usb

Files: *
License: MIT OR Apache-2.0
EOF
chmod 0644 "$ROOT/usr/share/doc/p2p-usb/copyright"

# Shared-library dependencies of the binaries, if dpkg-shlibdeps is available.
DEPENDS=
if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    mkdir -p "$STAGE/src/debian"
    printf 'Source: p2p-usb\n\nPackage: p2p-usb\nArchitecture: any\n' >"$STAGE/src/debian/control"
    bins=()
    for b in "$ROOT"/usr/bin/*; do
        # stand-in scripts (tests) have no ELF dependencies
        if [ "$(head -c 4 "$b" | od -An -c | tr -d ' ')" = '177ELF' ]; then bins+=("-e$b"); fi
    done
    if [ "${#bins[@]}" -gt 0 ]; then
        DEPENDS=$(cd "$STAGE/src" && dpkg-shlibdeps -O "${bins[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p') || DEPENDS=
    fi
fi
[ -n "$DEPENDS" ] || DEPENDS="libc6 (>= 2.34)"
# systemd >= 250: LoadCredential with ${CREDENTIALS_DIRECTORY}, PrivateIPC, ProtectProc, sysusers.
DEPENDS="$DEPENDS, systemd (>= 250)"

mkdir -p "$ROOT/DEBIAN"
INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat >"$ROOT/DEBIAN/control" <<EOF
Package: p2p-usb
Version: $VERSION
Architecture: $ARCH
Maintainer: p2p-usb developers <p2p-usb@users.noreply.github.com>
Installed-Size: $INSTALLED_SIZE
Depends: $DEPENDS
Recommends: udev
Suggests: usbip
Section: net
Priority: optional
Homepage: https://github.com/p2p-usb/p2p-usb
Description: share USB devices over the internet, peer to peer (iroh)
 Server side: p2p-usb-helper holds USB device access without any network,
 p2p-usb-agent talks to the network without any device access; both run as
 unprivileged, sandboxed systemd services driven by p2p-usb-server.target.
 Client side: p2p-usb attaches remote devices through vhci_hcd without root
 for members of group p2p-usb-attach.
EOF
# Files below /etc are configuration: dpkg keeps local edits on upgrade.
(cd "$ROOT" && find etc -type f | sed 's|^|/|' | sort) >"$ROOT/DEBIAN/conffiles"
for s in postinst prerm postrm; do
    install -m 0755 "$REPO/packaging/debian/$s" "$ROOT/DEBIAN/$s"
done
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/conffiles"

mkdir -p "$OUT_DIR"
DEB=$OUT_DIR/p2p-usb_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null

echo "== control =="
dpkg-deb --info "$DEB"
echo "== contents =="
dpkg-deb --contents "$DEB"
echo "$DEB"
