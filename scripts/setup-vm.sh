#!/usr/bin/env bash
# Installs what real-VM tests need, from Debian's packages: QEMU, a guest kernel, busybox for the
# initramfs, and (optional) igb_uio via DKMS so MSI-X interrupts reach the guest. Idempotent: a
# package already installed is left alone. Without root or apt it prints a NOTE and exits 0, and the
# VM tests skip. A DKMS build that fails is not fatal: guests then poll instead of taking interrupts.
set -uo pipefail
start=$(date +%s)

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "NOTE: setup-vm.sh needs root and apt-get; nothing installed, VM tests will skip"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log=/tmp/vmediad-setup-vm.log
: >"$log"

missing() {  # prints the packages in "$@" that dpkg does not report installed
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
  done
}

apt_updated=0
install() {  # install "$@" (only the missing ones); 0 on success
  local want
  want=$(missing "$@")
  if [ -z "$want" ]; then
    echo "already installed: $*"
    return 0
  fi
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq >>"$log" 2>&1 || true
    apt_updated=1
  fi
  # shellcheck disable=SC2086  # word splitting of the package list is intended
  if apt-get install -y -qq --no-install-recommends $want >>"$log" 2>&1; then
    echo "installed:" $want
    return 0
  fi
  echo "WARNING: apt-get install failed for:" $want "(see $log)"
  return 1
}

status=0
install qemu-system-x86 linux-image-amd64 busybox-static || status=1

# igb_uio binds ivshmem-doorbell's MSI-X vectors to /dev/uioN. It is built by DKMS for the newest
# installed linux-image (the guest kernel), which needs the matching headers.
kver=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sed 's|.*/vmlinuz-||' | sort -V | tail -n 1)
if [ -n "$kver" ]; then
  install "linux-headers-$kver" || install linux-headers-amd64 || true
  install dpdk-kmods-dkms || true
  if command -v dkms >/dev/null 2>&1 && ! find "/lib/modules/$kver" -name 'igb_uio.ko*' 2>/dev/null | grep -q .; then
    dkms autoinstall -k "$kver" >>"$log" 2>&1 || true
  fi
  ko=$(find "/lib/modules/$kver" -name 'igb_uio.ko*' 2>/dev/null | head -n 1)
  if [ -n "$ko" ]; then
    echo "igb_uio built for $kver: $ko (guests can take MSI-X interrupts)"
  else
    echo "NOTE: igb_uio did not build for $kver (see $log); guests will poll, no interrupts"
  fi
else
  echo "WARNING: no /boot/vmlinuz-* after install; VM tests will skip"
  status=1
fi

echo "setup-vm.sh: done in $(($(date +%s) - start)) s"
[ "$status" = 0 ] || echo "WARNING: some packages did not install; VM tests will skip"
exit 0
