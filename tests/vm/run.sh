#!/bin/bash
# Run the p2p-usb VM scenarios in a QEMU (TCG) Debian guest. See tests/vm/README.md.
#
#   tests/vm/run.sh [--bin-dir DIR] [--keep] [--verbose] [--timeout SECONDS]
#                   [--scenario-dir DIR] [--results FILE] [SCENARIO...]
#
# SCENARIO: a file name in the scenario dir (default tests/vm/scenarios), with or without
# .sh, or its NN prefix ("00", "90-kernel-usbip-baseline"). Default: all. Needs root.
# Environment: P2P_USB_VM_CACHE (guest cache, default /var/cache/p2p-usb-vm),
# P2P_USB_VM_WORK (run directory, default target/vm), P2P_USB_VM_TIMEOUT (default 1200).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin_dir=$repo/target/release
keep=0
verbose=()
timeout=${P2P_USB_VM_TIMEOUT:-1200}
cache=${P2P_USB_VM_CACHE:-/var/cache/p2p-usb-vm}
work=${P2P_USB_VM_WORK:-$repo/target/vm}
results=$repo/target/vm-results.txt
stick_mib=64
selectors=()
scenario_dir=$here/scenarios

HOST_PACKAGES=(qemu-system-x86 qemu-utils debootstrap busybox-static cpio kmod e2fsprogs python3)

usage() { sed -n '2,10s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) bin_dir=$(cd "${2:?--bin-dir needs a directory}" && pwd); shift 2 ;;
    --keep) keep=1; shift ;;
    --verbose|-v) verbose=(--verbose); shift ;;
    --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
    --results) results=${2:?--results needs a file}; shift 2 ;;
    --scenario-dir) scenario_dir=$(cd "${2:?--scenario-dir needs a directory}" && pwd); shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; usage 64 >&2 ;;
    *) selectors+=("$1"); shift ;;
  esac
done

t_start=$SECONDS
say() { printf '[vm %4ds] %s\n' "$((SECONDS - t_start))" "$*"; }

# --- 1. host packages (idempotent: apt only runs when something is missing) ------------
missing=()
for p in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing host packages: ${missing[*]}"
  aptlog=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$aptlog" 2>&1; then
    cat "$aptlog" >&2
    exit 1
  fi
  rm -f "$aptlog"
fi

# --- 2. guest image, cached by a hash of everything that goes into it ------------------
kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}'
}
kpkg=$(kernel_package)
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(kernel_package)
fi
[ -n "$kpkg" ] || { echo "run.sh: cannot resolve linux-image-amd64" >&2; exit 1; }
kver=$(apt-cache show --no-all-versions "$kpkg" | awk '$1 == "Version:" {print $2; exit}')
key=$(
  cd "$here"
  cat build-guest.sh guest/init guest/vmtest-start guest/p2p-usb-vmtest.service
  echo "$kpkg=$kver $("$here/build-guest.sh" --mirror)"
)
key=$(printf '%s' "$key" | sha256sum | cut -c1-16)
guest=$cache/guest-$key

mkdir -p "$cache"
if [ ! -f "$guest/manifest.txt" ]; then
  exec 8>"$cache/.lock"
  flock 8 # another run may be building the same guest
  if [ ! -f "$guest/manifest.txt" ]; then
    say "building guest $key ($kpkg $kver) in $cache"
    t=$SECONDS
    rm -rf "$guest.tmp"
    "$here/build-guest.sh" "$guest.tmp" "$kpkg"
    mv "$guest.tmp" "$guest"
    # Keep only the current guest: each one is ~1 GB of sparse images.
    find "$cache" -mindepth 1 -maxdepth 1 -name 'guest-*' ! -name "guest-$key" -exec rm -rf {} +
    say "guest built in $((SECONDS - t))s"
  fi
  exec 8>&-
else
  say "guest $key cached ($kpkg $kver)"
fi

# --- 3. per-run payload disk ---------------------------------------------------------
mkdir -p "$work"
exec 9>"$work/.lock"
flock -n 9 || { echo "run.sh: another VM run uses $work" >&2; exit 1; }

all=()
for f in "$scenario_dir"/[0-9][0-9]-*.sh; do # glob order is sorted
  if [ -f "$f" ]; then all+=("${f##*/}"); fi
done
selected=()
if [ ${#selectors[@]} -eq 0 ]; then
  selected=("${all[@]}")
else
  for sel in "${selectors[@]}"; do
    sel=${sel##*/}
    sel=${sel%.sh}
    found=0
    for s in "${all[@]}"; do
      if [ "${s%.sh}" = "$sel" ] || [[ $s == "$sel"-* ]]; then
        selected+=("$s")
        found=1
      fi
    done
    [ "$found" = 1 ] || { echo "run.sh: no scenario matches '$sel' (have: ${all[*]})" >&2; exit 64; }
  done
  mapfile -t selected < <(printf '%s\n' "${selected[@]}" | sort -u)
fi
[ ${#selected[@]} -gt 0 ] || { echo "run.sh: no scenarios in $scenario_dir" >&2; exit 64; }

t=$SECONDS
stage=$work/payload-root
rm -rf "$stage" "$work/out" "$work/console.log"
mkdir -p "$stage/vm" "$stage/scenarios" "$stage/repo/target/release" "$stage/out"
install -m 0755 "$here/guest/runner.sh" "$here/guest/vmctl" "$stage/vm/"
cp -a "$here/scenarios/lib.sh" "$stage/scenarios/" # other scenario dirs share lib.sh
cp -a "$scenario_dir/." "$stage/scenarios/"
for d in scripts systemd udev examples packaging docs; do
  if [ -d "$repo/$d" ]; then cp -a "$repo/$d" "$stage/repo/"; fi
done
nbin=0
for b in p2p-usb-helper p2p-usb-agent p2p-usb; do
  if [ -f "$bin_dir/$b" ]; then
    install -m 0755 "$bin_dir/$b" "$stage/repo/target/release/"
    nbin=$((nbin + 1))
  fi
done
# Test tools beside the binaries, for the scenarios that drive the helper directly.
if [ -f "$bin_dir/usbfs-probe" ]; then install -m 0755 "$bin_dir/usbfs-probe" "$stage/repo/target/release/"; fi
ln -s repo/target/release "$stage/bin"

# Random content each run, so nothing can pass by reading stale or cached data.
head -c "$((stick_mib * 1024 * 1024))" /dev/urandom >"$work/stick.img"
stick_sha=$(sha256sum "$work/stick.img" | cut -d' ' -f1)
: >"$work/serial.out"

cat >"$stage/vm.env" <<EOF
VM_SCENARIOS="${selected[*]}"
VM_SCENARIO_TIMEOUT=300
VM_PAYLOAD=/payload
VM_OUT=/payload/out
VM_STICK_ID=stick
VM_STICK_VIDPID=46f4:0001
VM_STICK_SIZE=$((stick_mib * 1024 * 1024))
VM_STICK_SHA256=$stick_sha
VM_KBD_ID=kbd
VM_KBD_VIDPID=0627:0001
VM_SERIAL_ID=serial
VM_SERIAL_VIDPID=0403:6001
P2P_USB_REPO=/payload/repo
P2P_USB_BIN_DIR=/payload/repo/target/release
VM_HAVE_BINARIES=$([ "$nbin" = 3 ] && echo 1 || echo 0)
EOF

mb=$(( $(du -sm "$stage" | cut -f1) + 256 )) # room for logs in /out
rm -f "$work/payload.img"
truncate -s "${mb}M" "$work/payload.img"
mkfs.ext4 -q -L payload -d "$stage" "$work/payload.img"
say "payload ready in $((SECONDS - t))s: ${#selected[@]} scenario(s), $nbin/3 binaries from $bin_dir"

# --- 4. boot, serve the control channel, collect results -------------------------------
say "booting QEMU (TCG); console in $work/console.log"
set +e
python3 "$here/vmhost.py" "${verbose[@]}" --workdir "$work" --timeout "$timeout" \
  --kernel "$guest/vmlinuz" --initrd "$guest/initramfs.cpio.gz" --rootfs "$guest/rootfs.img" \
  --payload "$work/payload.img" --stick "$work/stick.img" --serial-out "$work/serial.out" \
  --results "$results" "${selected[@]%.sh}"
rc=$?
set -e

if [ "$keep" = 1 ]; then
  say "kept $work (payload.img, stick.img, qemu-cmd.txt, console.log, out/)"
else
  rm -rf "$stage" "$work/payload.img" "$work/stick.img"
fi
say "VM stage finished (exit $rc); results in $results, guest logs in $work/out"
exit "$rc"
