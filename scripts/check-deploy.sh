#!/usr/bin/env bash
# CI checks for the deployment side of p2p-usb (systemd/, udev/, packaging/, scripts/).
#
#   ./scripts/check-deploy.sh [--bin-dir DIR] [--require-binaries] [--keep]
#
#  1. tools: installs shellcheck / dpkg-dev / systemd with apt-get when missing
#  2. shellcheck on scripts/*.sh, the VM harness and scenarios, and the Debian maintainer scripts
#  3. the installer into a DESTDIR (PREFIX=/usr/local): exact file list with modes,
#     idempotent re-run, an existing config is never overwritten
#  4. systemd-analyze verify --man=no on every unit (templates as instance "ci"),
#     with ExecStart pointed at the binaries installed in that DESTDIR
#  5. systemd-analyze security --offline=yes on every service: fails above 2.0
#  6. the hardening of plain and template units has not drifted apart
#  7. sysusers.d / tmpfiles.d applied to a scratch root; udev rule syntax
#  8. the .deb: built, listed, checked (paths, modes, conffiles, ExecStart, verify)
#  9. the uninstaller (with --purge) empties the DESTDIR again
#
# Binaries come from --bin-dir (default target/release). If they are missing,
# shell stand-ins are used (the checks only need executables where ExecStart
# points) unless --require-binaries is given.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=$REPO/target/release
REQUIRE_BINS=0
KEEP=0
MAX_EXPOSURE=2.0

while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) BIN_DIR=${2:?--bin-dir needs a directory}; shift ;;
        --bin-dir=*) BIN_DIR=${1#*=} ;;
        --require-binaries) REQUIRE_BINS=1 ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/p2p-usb-check.XXXXXX")
if [ "$KEEP" -eq 1 ]; then
    echo "work directory (kept): $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi

FAILURES=()
fail() { FAILURES+=("$*"); printf '  FAIL %s\n' "$*"; }
ok() { printf '  ok   %s\n' "$*"; }
section() { printf '\n== %s ==\n' "$*"; }
check() { # description command...: ok if the command succeeds, FAIL otherwise
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}

BINS=(p2p-usb-helper p2p-usb-agent p2p-usb)
PLAIN_UNITS=(p2p-usb-server.target p2p-usb-helper.socket p2p-usb-helper.service p2p-usb-agent.service)
TEMPLATES=(p2p-usb-server@.target p2p-usb-helper@.socket p2p-usb-helper@.service p2p-usb-agent@.service)
SERVICES=(p2p-usb-helper.service p2p-usb-agent.service p2p-usb-helper@ci.service p2p-usb-agent@ci.service)

# ---------------------------------------------------------------------------
section "1. tools"
need_pkgs=()
command -v shellcheck >/dev/null 2>&1 || need_pkgs+=(shellcheck)
command -v dpkg-deb >/dev/null 2>&1 || need_pkgs+=(dpkg)
command -v dpkg-shlibdeps >/dev/null 2>&1 || need_pkgs+=(dpkg-dev)
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n); fi
    fi
    if [ "$(id -u)" -eq 0 ] || [ "${#SUDO[@]}" -gt 0 ]; then
        echo "  installing: ${need_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! "${SUDO[@]}" apt-get install -y -qq "${need_pkgs[@]}" >"$WORK/apt.log" 2>&1; then
            "${SUDO[@]}" apt-get update -qq >>"$WORK/apt.log" 2>&1 || true
            "${SUDO[@]}" apt-get install -y -qq "${need_pkgs[@]}" >>"$WORK/apt.log" 2>&1 \
                || { cat "$WORK/apt.log"; echo "error: apt-get install failed" >&2; exit 1; }
        fi
    else
        echo "error: missing tools (${need_pkgs[*]}) and no root/sudo to install them" >&2
        exit 1
    fi
fi
for t in shellcheck dpkg-deb systemd-analyze systemd-sysusers systemd-tmpfiles; do
    command -v "$t" >/dev/null 2>&1 || { echo "error: $t still missing" >&2; exit 1; }
done
ok "$(shellcheck --version | sed -n 's/^version: /shellcheck /p'), $(systemd-analyze --version | head -1), dpkg-deb $(dpkg-deb --version | sed -n '1s/.*version \([^ ]*\).*/\1/p')"

# ---------------------------------------------------------------------------
section "binaries"
have_all=1
for b in "${BINS[@]}"; do [ -x "$BIN_DIR/$b" ] || have_all=0; done
if [ "$have_all" -eq 1 ]; then
    ok "using $BIN_DIR"
elif [ "$REQUIRE_BINS" -eq 1 ]; then
    echo "error: ${BINS[*]} not all present in $BIN_DIR (cargo build --release)" >&2
    exit 1
else
    echo "  note: ${BINS[*]} not all in $BIN_DIR; using shell stand-ins"
    BIN_DIR=$WORK/stand-in-bin
    mkdir -p "$BIN_DIR"
    for b in "${BINS[@]}"; do
        printf '#!/bin/sh\necho "stand-in for %s" >&2\nexit 0\n' "$b" >"$BIN_DIR/$b"
        chmod 0755 "$BIN_DIR/$b"
    done
fi

# ---------------------------------------------------------------------------
section "2. shellcheck"
scripts=("$REPO"/scripts/*.sh)
for f in "$REPO"/tests/vm/*.sh "$REPO"/tests/vm/scenarios/*.sh "$REPO"/tests/vm/guest/runner.sh \
    "$REPO"/tests/vm/guest/vmctl "$REPO"/tests/vm/guest/vmtest-start; do
    [ -e "$f" ] && scripts+=("$f")
done
for f in postinst prerm postrm; do scripts+=("$REPO/packaging/debian/$f"); done
if shellcheck -x "${scripts[@]}"; then
    ok "${#scripts[@]} scripts: ${scripts[*]#"$REPO"/}"
else
    fail "shellcheck"
fi

# ---------------------------------------------------------------------------
section "3. install into DESTDIR (PREFIX=/usr/local)"
DEST=$WORK/dest
if DESTDIR=$DEST PREFIX=/usr/local "$REPO/scripts/install-service.sh" --all --bin-dir "$BIN_DIR" >"$WORK/install.log" 2>&1; then
    ok "install-service.sh --all"
else
    cat "$WORK/install.log"; fail "install-service.sh into DESTDIR"
fi
cat >"$WORK/expected-local" <<'EOF'
755 d etc/p2p-usb
600 f etc/p2p-usb/server.toml
644 f etc/p2p-usb/client.toml
644 f etc/modules-load.d/p2p-usb-vhci.conf
644 f etc/sysusers.d/p2p-usb-client.conf
644 f etc/sysusers.d/p2p-usb-server.conf
644 f etc/systemd/system/p2p-usb-agent.service
644 f etc/systemd/system/p2p-usb-agent@.service
644 f etc/systemd/system/p2p-usb-helper.service
644 f etc/systemd/system/p2p-usb-helper.socket
644 f etc/systemd/system/p2p-usb-helper@.service
644 f etc/systemd/system/p2p-usb-helper@.socket
644 f etc/systemd/system/p2p-usb-server.target
644 f etc/systemd/system/p2p-usb-server@.target
644 f etc/tmpfiles.d/p2p-usb.conf
644 f etc/udev/rules.d/70-p2p-usb-helper.rules
644 f etc/udev/rules.d/70-p2p-usb-vhci.rules
755 f usr/local/bin/p2p-usb
755 f usr/local/bin/p2p-usb-agent
755 f usr/local/bin/p2p-usb-helper
644 f usr/local/share/doc/p2p-usb/SYSTEMD.md
644 f usr/local/share/doc/p2p-usb/examples/69-p2p-usb-scope.rules.example
644 f usr/local/share/doc/p2p-usb/examples/client.toml
644 f usr/local/share/doc/p2p-usb/examples/server.toml
EOF
tree_listing() { # every file, plus the directories named in the expected list
    (cd "$1" && { find . -type f -printf '%m %y %P\n'; find . -type d -path ./etc/p2p-usb -printf '%m %y %P\n'; }) | sort -k3
}
sort -k3 "$WORK/expected-local" >"$WORK/expected-local.sorted"
tree_listing "$DEST" >"$WORK/actual-local"
if diff -u "$WORK/expected-local.sorted" "$WORK/actual-local"; then
    ok "$(wc -l <"$WORK/actual-local") entries with the expected modes:"
    sed 's/^/         /' "$WORK/actual-local"
else
    fail "DESTDIR tree differs from the expected list (diff above: - expected, + actual)"
fi
if grep -q '^ExecStart=/usr/local/bin/p2p-usb-agent ' "$DEST/etc/systemd/system/p2p-usb-agent.service"; then
    ok "ExecStart points at /usr/local/bin"
else
    fail "ExecStart of the installed agent unit does not point at /usr/local/bin"
fi
echo '# local edit' >>"$DEST/etc/p2p-usb/server.toml"
if DESTDIR=$DEST PREFIX=/usr/local "$REPO/scripts/install-service.sh" --all --bin-dir "$BIN_DIR" >"$WORK/install2.log" 2>&1 \
    && grep -q '^# local edit$' "$DEST/etc/p2p-usb/server.toml" \
    && tree_listing "$DEST" | diff -q - "$WORK/actual-local" >/dev/null; then
    ok "second run: same tree, existing server.toml kept"
else
    cat "$WORK/install2.log"; fail "re-running the installer changed the tree or overwrote the config"
fi
# Files of the single-unit design are pointed out, not touched.
install -D -m 644 /dev/null "$DEST/etc/udev/rules.d/99-p2p-usb.rules"
if DESTDIR=$DEST PREFIX=/usr/local "$REPO/scripts/install-service.sh" --all --bin-dir "$BIN_DIR" >"$WORK/install3.log" 2>&1 \
    && grep -q 'found /etc/udev/rules.d/99-p2p-usb.rules of the single-unit design' "$WORK/install3.log" \
    && [ -e "$DEST/etc/udev/rules.d/99-p2p-usb.rules" ]; then
    ok "a leftover of the single-unit design is reported and kept"
else
    cat "$WORK/install3.log"; fail "the installer did not report the single-unit udev rule"
fi
rm -f "$DEST/etc/udev/rules.d/99-p2p-usb.rules"

# ---------------------------------------------------------------------------
section "4. systemd-analyze verify"
# Units as installed, with ExecStart pointed into the DESTDIR where the binaries are;
# templates are checked as instance "ci" (a symlink named like an instance).
verify_dir() { # dir-with-units bin-prefix-in-units real-bin-dir label
    local dir=$1 from=$2 to=$3 label=$4 vdir out
    vdir=$WORK/verify-$label
    mkdir -p "$vdir"
    for u in "${PLAIN_UNITS[@]}" "${TEMPLATES[@]}"; do
        sed "s|$from|$to/|g" "$dir/$u" >"$vdir/$u"
    done
    for t in "${TEMPLATES[@]}"; do ln -sf "$t" "$vdir/${t/@/@ci}"; done
    local units=()
    for u in "${PLAIN_UNITS[@]}" "${TEMPLATES[@]}"; do units+=("$vdir/${u/@/@ci}"); done
    if out=$(systemd-analyze verify --man=no "${units[@]}" 2>&1) && [ -z "$out" ]; then
        ok "$label: ${#units[@]} units verify cleanly: $(cd "$vdir" && for u in "${units[@]}"; do printf '%s ' "${u##*/}"; done)"
    else
        printf '%s\n' "$out" | sed 's/^/         /'
        fail "$label: systemd-analyze verify reported problems"
    fi
}
verify_dir "$DEST/etc/systemd/system" /usr/local/bin/ "$DEST/usr/local/bin" installed

# ---------------------------------------------------------------------------
section "5. systemd-analyze security --offline=yes (max $MAX_EXPOSURE)"
threshold=$(awk -v m="$MAX_EXPOSURE" 'BEGIN { printf "%d", m * 10 + 0.5 }')
for s in "${SERVICES[@]}"; do
    rc=0
    out=$(systemd-analyze security --offline=yes --threshold="$threshold" "$WORK/verify-installed/$s" 2>&1) || rc=$?
    level=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    if [ -z "$level" ]; then
        printf '%s\n' "$out" | sed 's/^/         /'
        fail "$s: no exposure level in the output"
    elif [ "$rc" -ne 0 ] || awk -v l="$level" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(l > m) }'; then
        printf '%s\n' "$out" | grep -v '^✓' | sed 's/^/         /'
        fail "$s: exposure $level > $MAX_EXPOSURE"
    else
        ok "$s: exposure $level"
        printf '%s\n' "$out" | grep '^✗' | sed 's/  \+/  /g; s/^/         /'
    fi
done

# ---------------------------------------------------------------------------
section "6. plain and template units carry the same hardening"
common_block() { sed -n '/^# BEGIN COMMON HARDENING$/,/^# END COMMON HARDENING$/p' "$1"; }
# Every Key= line of [Service] except the ones that must differ per instance.
service_keys() {
    awk '/^\[/{s=($0=="[Service]")} s && /^[A-Za-z]+=/' "$1" \
        | grep -Ev '^(ExecStart|LoadCredential|StateDirectory|RuntimeDirectory|RuntimeDirectoryPreserve)='
}
ref=$REPO/systemd/p2p-usb-helper.service
[ -n "$(common_block "$ref")" ] || fail "no COMMON HARDENING block in $ref"
for u in p2p-usb-helper@.service p2p-usb-agent.service p2p-usb-agent@.service; do
    if diff -u <(common_block "$ref") <(common_block "$REPO/systemd/$u") >"$WORK/d" ; then
        ok "common hardening block of $u = p2p-usb-helper.service"
    else
        cat "$WORK/d"; fail "common hardening block of $u differs from p2p-usb-helper.service"
    fi
done
for pair in p2p-usb-helper.service:p2p-usb-helper@.service p2p-usb-agent.service:p2p-usb-agent@.service; do
    a=${pair%%:*} b=${pair#*:}
    if diff -u <(service_keys "$REPO/systemd/$a") <(service_keys "$REPO/systemd/$b") >"$WORK/d"; then
        ok "[Service] of $b = $a (except ExecStart, LoadCredential, State/RuntimeDirectory)"
    else
        cat "$WORK/d"; fail "[Service] of $b drifted from $a"
    fi
done

# ---------------------------------------------------------------------------
section "7. sysusers.d, tmpfiles.d, udev rules"
SYSROOT=$WORK/sysroot
mkdir -p "$SYSROOT/etc" "$SYSROOT/usr/lib/tmpfiles.d"
if cat "$REPO"/packaging/sysusers.d/*.conf | systemd-sysusers --root="$SYSROOT" - >"$WORK/sysusers.log" 2>&1; then
    ok "systemd-sysusers applied to a scratch root"
else
    cat "$WORK/sysusers.log"; fail "systemd-sysusers"
fi
for u in p2p-usb-helper p2p-usb; do
    check "user $u (nologin shell)" grep -q "^$u:x:[0-9]*:[0-9]*:.*:/usr/sbin/nologin$" "$SYSROOT/etc/passwd"
done
for g in usb-proxy p2p-usb-admin p2p-usb-attach p2p-usb-helper p2p-usb; do
    check "group $g" grep -q "^$g:" "$SYSROOT/etc/group"
done
check "p2p-usb-helper is a member of usb-proxy" \
    grep -Eq '^usb-proxy:x:[0-9]+:(.*,)?p2p-usb-helper(,.*)?$' "$SYSROOT/etc/group"
cp "$REPO/packaging/tmpfiles.d/p2p-usb.conf" "$SYSROOT/usr/lib/tmpfiles.d/"
agent_gid=$(awk -F: '$1 == "p2p-usb" {print $3}' "$SYSROOT/etc/group")
if [ "$(id -u)" -eq 0 ]; then
    if systemd-tmpfiles --root="$SYSROOT" --create p2p-usb.conf 2>"$WORK/tmpfiles.log" \
        && [ "$(stat -c '%a %u %g' "$SYSROOT/run/p2p-usb")" = "750 0 $agent_gid" ]; then
        ok "tmpfiles: /run/p2p-usb 0750 root:p2p-usb"
    else
        cat "$WORK/tmpfiles.log"; fail "tmpfiles did not create /run/p2p-usb 0750 root:p2p-usb"
    fi
else
    # Without root the chown step cannot work; check the mode and the requested owner.
    systemd-tmpfiles --root="$SYSROOT" --create p2p-usb.conf 2>"$WORK/tmpfiles.log" || true
    if [ "$(stat -c '%a' "$SYSROOT/run/p2p-usb" 2>/dev/null)" = 750 ] \
        && grep -Eq '^d /run/p2p-usb 0750 root p2p-usb -$' "$REPO/packaging/tmpfiles.d/p2p-usb.conf"; then
        ok "tmpfiles: /run/p2p-usb 0750 (owner root:p2p-usb requested; not applied without root)"
    else
        cat "$WORK/tmpfiles.log"; fail "tmpfiles did not create /run/p2p-usb 0750"
    fi
fi
# udev: every rule line is a comma-separated list of KEY[{attr}]OP"value".
udev_re='^[A-Z_]+(\{[^}]+\})?(==|!=|=|\+=|-=|:=)"[^"]*"(, *[A-Z_]+(\{[^}]+\})?(==|!=|=|\+=|-=|:=)"[^"]*")*$'
for r in "$REPO"/udev/*.rules "$REPO"/udev/*.rules.example; do
    bad=$(grep -Ev '^[[:space:]]*(#|$)' "$r" | grep -Ev "$udev_re" || true)
    if [ -z "$bad" ]; then ok "udev syntax: ${r#"$REPO"/}"; else printf '%s\n' "$bad"; fail "udev syntax: ${r#"$REPO"/}"; fi
    while read -r g; do
        [ -z "$g" ] || grep -q "^$g:" "$SYSROOT/etc/group" \
            || fail "${r##*/} uses group $g that sysusers.d does not create"
    done < <(grep -Eo '(GROUP="[^"]+"|chgrp [a-z0-9-]+)' "$r" | sed 's/GROUP="//; s/"$//; s/chgrp //' | sort -u)
done
if command -v udevadm >/dev/null 2>&1 && udevadm verify --help >/dev/null 2>&1; then
    check "udevadm verify" udevadm verify "$REPO"/udev/*.rules
fi

# ---------------------------------------------------------------------------
section "8. Debian package"
if "$REPO/scripts/build-deb.sh" --bin-dir "$BIN_DIR" --out "$WORK/deb" >"$WORK/deb.log" 2>&1; then
    DEB=$(tail -n 1 "$WORK/deb.log")
    ok "built $(basename "$DEB") ($(du -h "$DEB" | cut -f1))"
    sed -n '/^== control ==$/,$p' "$WORK/deb.log" | sed '$d; s/^/         /'
    dpkg-deb --contents "$DEB" | awk '{print $1, $2, $6}' | sed 's|\./||' >"$WORK/deb-contents"
    while read -r perms path; do
        if awk -v p="$perms" -v f="$path" '$1 == p && $2 == "root/root" && $3 == f {found=1} END {exit !found}' "$WORK/deb-contents"; then
            :
        else
            fail "deb: missing or wrong: $perms root/root $path"
        fi
    done <<'EOF'
-rwxr-xr-x usr/bin/p2p-usb-helper
-rwxr-xr-x usr/bin/p2p-usb-agent
-rwxr-xr-x usr/bin/p2p-usb
-rw-r--r-- usr/lib/systemd/system/p2p-usb-server.target
-rw-r--r-- usr/lib/systemd/system/p2p-usb-helper.socket
-rw-r--r-- usr/lib/systemd/system/p2p-usb-helper.service
-rw-r--r-- usr/lib/systemd/system/p2p-usb-agent.service
-rw-r--r-- usr/lib/systemd/system/p2p-usb-server@.target
-rw-r--r-- usr/lib/systemd/system/p2p-usb-helper@.socket
-rw-r--r-- usr/lib/systemd/system/p2p-usb-helper@.service
-rw-r--r-- usr/lib/systemd/system/p2p-usb-agent@.service
-rw-r--r-- usr/lib/udev/rules.d/70-p2p-usb-helper.rules
-rw-r--r-- usr/lib/udev/rules.d/70-p2p-usb-vhci.rules
-rw-r--r-- usr/lib/sysusers.d/p2p-usb-server.conf
-rw-r--r-- usr/lib/sysusers.d/p2p-usb-client.conf
-rw-r--r-- usr/lib/tmpfiles.d/p2p-usb.conf
-rw-r--r-- usr/lib/modules-load.d/p2p-usb-vhci.conf
-rw------- etc/p2p-usb/server.toml
-rw-r--r-- etc/p2p-usb/client.toml
-rw-r--r-- usr/share/doc/p2p-usb/SYSTEMD.md
-rw-r--r-- usr/share/doc/p2p-usb/copyright
-rw-r--r-- usr/share/doc/p2p-usb/examples/server.toml
-rw-r--r-- usr/share/doc/p2p-usb/examples/client.toml
-rw-r--r-- usr/share/doc/p2p-usb/examples/69-p2p-usb-scope.rules.example
EOF
    nfiles=$(grep -c '^-' "$WORK/deb-contents")
    check "deb: exactly the 24 expected files ($nfiles), modes and root/root ownership" [ "$nfiles" -eq 24 ]
    mkdir -p "$WORK/debctl" "$WORK/debroot"
    dpkg-deb --control "$DEB" "$WORK/debctl"
    dpkg-deb --extract "$DEB" "$WORK/debroot"
    for s in postinst prerm postrm; do
        check "deb: maintainer script $s" [ -x "$WORK/debctl/$s" ]
    done
    if diff <(printf '/etc/p2p-usb/client.toml\n/etc/p2p-usb/server.toml\n') <(sort "$WORK/debctl/conffiles") >/dev/null; then
        ok "deb: conffiles = /etc/p2p-usb/{client,server}.toml"
    else
        fail "deb: conffiles wrong: $(tr '\n' ' ' <"$WORK/debctl/conffiles")"
    fi
    postinst_ok() {
        grep -q 'systemd-sysusers' "$1" && grep -q 'daemon-reload' "$1" && grep -q 'udevadm control --reload-rules' "$1"
    }
    check "deb: postinst runs sysusers, daemon-reload, udev reload" postinst_ok "$WORK/debctl/postinst"
    if grep -q '^ExecStart=/usr/bin/p2p-usb-helper ' "$WORK/debroot/usr/lib/systemd/system/p2p-usb-helper.service"; then
        ok "deb: ExecStart points at /usr/bin"
    else
        fail "deb: ExecStart not rewritten to /usr/bin"
    fi
    verify_dir "$WORK/debroot/usr/lib/systemd/system" /usr/bin/ "$WORK/debroot/usr/bin" deb
else
    cat "$WORK/deb.log"; fail "build-deb.sh"
fi

# ---------------------------------------------------------------------------
section "9. uninstall --purge from the DESTDIR"
# An administrator's scope rule, copied from the example, goes with --purge too.
install -D -m 644 "$REPO/udev/69-p2p-usb-scope.rules.example" "$DEST/etc/udev/rules.d/69-p2p-usb-scope.rules"
if DESTDIR=$DEST PREFIX=/usr/local "$REPO/scripts/uninstall-service.sh" --purge >"$WORK/uninstall.log" 2>&1 \
    && DESTDIR=$DEST PREFIX=/usr/local "$REPO/scripts/uninstall-service.sh" --purge >>"$WORK/uninstall.log" 2>&1; then
    left=$(cd "$DEST" && find . -type f | sort)
    if [ -z "$left" ]; then ok "no files left (ran twice)"; else printf '%s\n' "$left"; fail "files left after uninstall --purge"; fi
else
    cat "$WORK/uninstall.log"; fail "uninstall-service.sh"
fi

# ---------------------------------------------------------------------------
echo
if [ "${#FAILURES[@]}" -eq 0 ]; then
    echo "check-deploy: all checks passed"
else
    echo "check-deploy: ${#FAILURES[@]} check(s) failed:"
    printf '  - %s\n' "${FAILURES[@]}"
    exit 1
fi
