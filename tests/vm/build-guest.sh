#!/bin/bash
# Build the cached Debian bookworm test guest: kernel, tiny initramfs, systemd rootfs.
#
#   build-guest.sh OUTDIR KERNEL_PACKAGE
#   build-guest.sh --mirror        (prints the Debian mirror it would use)
#
# OUTDIR receives vmlinuz, initramfs.cpio.gz, rootfs.img and manifest.txt. run.sh calls
# this only when its cache key (a hash of this file, tests/vm/guest/{init,vmtest-start,
# p2p-usb-vmtest.service}, the kernel package version and the mirror) has no entry.
# Needs root (debootstrap), debootstrap, busybox-static, cpio, kmod, e2fsprogs.
set -euo pipefail

out=${1:?usage: build-guest.sh OUTDIR KERNEL_PACKAGE}
here=$(cd "$(dirname "$0")" && pwd)

# Userspace of the guest. minbase + what the scenarios and the project's units need.
GUEST_PACKAGES=systemd,systemd-sysv,udev,kmod,usbip,usbutils,iproute2,dbus,sudo,util-linux,procps,psmisc,e2fsprogs,netcat-openbsd,less
# Module directories left out of the rootfs: large and useless in this guest.
MODULE_EXCLUDES=(sound drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet
  drivers/infiniband drivers/staging drivers/iio drivers/isdn drivers/bluetooth net/bluetooth
  net/wireless net/mac80211)
# Modules the initramfs loads to mount the rootfs. crc32c_generic because TCG's CPU
# model has no SSE4.2, so crc32c-intel fails and ext4 would not mount without it.
INITRAMFS_MODULES=(virtio_pci virtio_blk crc32c_generic ext4)

mirror() {
  # The host's own Debian mirror (deb822 sources), else deb.debian.org.
  local m
  m=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  echo "${m:-http://deb.debian.org/debian}"
}

if [ "$out" = --mirror ]; then
  mirror
  exit 0
fi

log() { printf '[build-guest] %s\n' "$*" >&2; }

kpkg=${2:?usage: build-guest.sh OUTDIR KERNEL_PACKAGE}
work=$(mktemp -d "${out%/}.build.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
chmod 755 "$work" # apt-get download runs as _apt and must be able to write here

# --- kernel ------------------------------------------------------------------
log "kernel: $kpkg"
(cd "$work" && apt-get download -qq "$kpkg") 2>&1 | { grep -v 'unsandboxed as root' || true; } >&2
deb=$(ls "$work"/"$kpkg"_*.deb)
dpkg -x "$deb" "$work/k"
kver=$(ls "$work/k/lib/modules")
depmod -b "$work/k" "$kver"

# --- rootfs ------------------------------------------------------------------
root=$work/root
log "debootstrap bookworm from $(mirror)"
debootstrap --variant=minbase --include="$GUEST_PACKAGES" bookworm "$root" "$(mirror)" \
  >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

log "modules $kver"
mkdir -p "$root/lib/modules"
cp -a "$work/k/lib/modules/$kver" "$root/lib/modules/"
for d in "${MODULE_EXCLUDES[@]}"; do rm -rf "$root/lib/modules/$kver/kernel/$d"; done
depmod -b "$root" "$kver"

# Guest configuration. Fixed machine-id: an empty one would trigger first-boot logic.
echo p2p-usb-vm >"$root/etc/hostname"
echo 0f2b6c1e8d4a4f0b9a7c3e5d1b2a4c6e >"$root/etc/machine-id"
cat >"$root/etc/fstab" <<'EOF'
LABEL=root    /         ext4  defaults                                   0 0
LABEL=payload /payload  ext4  defaults,nofail,x-systemd.device-timeout=60s 0 0
EOF
mkdir -p "$root/payload"
# The serial getty would hang up ttyS0, which carries the test output.
ln -sf /dev/null "$root/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$root/etc/systemd/system/getty@tty1.service"
# Nothing to persist: the rootfs is booted with snapshot=on.
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$root/etc/systemd/journald.conf.d/vm.conf"
install -m 0755 "$here/guest/vmtest-start" "$root/usr/local/sbin/vmtest-start"
install -m 0644 "$here/guest/p2p-usb-vmtest.service" "$root/etc/systemd/system/"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf ../p2p-usb-vmtest.service "$root/etc/systemd/system/multi-user.target.wants/"

log "rootfs.img"
mb=$(( $(du -sm "$root" | cut -f1) + 512 )) # headroom for scenarios installing things
truncate -s "${mb}M" "$work/rootfs.img" # pre-created: mkfs would announce creating it
mkfs.ext4 -q -L root -d "$root" "$work/rootfs.img"

# --- initramfs: busybox + the modules to mount /dev/vda ------------------------
log "initramfs"
ir=$work/initramfs
mkdir -p "$ir"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$ir/bin/busybox"
install -m 0755 "$here/guest/init" "$ir/init"
: >"$ir/modules.list"
for m in "${INITRAMFS_MODULES[@]}"; do
  # "insmod /path/x.ko" lines in load order; "builtin x" lines need nothing.
  modprobe -d "$work/k" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}' |
    while read -r ko; do
      rel=${ko#"$work/k/lib/modules/$kver/"}
      grep -qxF "$rel" "$ir/modules.list" && continue
      mkdir -p "$ir/lib/modules/$(dirname "$rel")"
      cp "$ko" "$ir/lib/modules/$rel"
      echo "$rel" >>"$ir/modules.list"
    done
done
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.cpio.gz"

cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz"
{
  echo "kernel_package=$kpkg"
  echo "kernel_version=$kver"
  echo "mirror=$(mirror)"
  echo "built=$(date -u +%FT%TZ)"
  # shellcheck disable=SC2016 # dpkg-query's own ${...} format
  chroot "$root" dpkg-query -W -f '${Package}=${Version}\n' systemd udev usbip
} >"$work/manifest.txt"

mkdir -p "$out"
mv "$work/vmlinuz" "$work/initramfs.cpio.gz" "$work/rootfs.img" "$work/manifest.txt" "$out/"
log "done: $out"
