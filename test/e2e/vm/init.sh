#!/bin/sh
# PID 1 inside the initramfs (static busybox): load the modules the root file
# system needs, mount the host's / read-only (9p) under a tmpfs overlay, mount
# the run dir, and hand over to the run dir's boot.sh in the new root.
export PATH=/bin
fail() {
  echo "meshgate-vm: $*"
  echo o > /proc/sysrq-trigger
  sleep 10
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
if grep -q meshgate.probe /proc/cmdline; then
  echo "meshgate-vm: probe ok"
  echo o > /proc/sysrq-trigger
  sleep 10
fi
while read -r m; do insmod "/modules/$m" || echo "meshgate-vm: insmod $m failed"; done < /modules/order
opts=trans=virtio,version=9p2000.L,msize=262144
mkdir -p /host /rw /root
mount -t 9p -o "$opts,cache=loose,ro" host /host || fail "cannot mount the host's file system"
mount -t tmpfs -o mode=755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /root || fail "cannot mount the overlay"
mkdir -p /root/run/meshgate-vm
mount -t 9p -o "$opts" run /root/run/meshgate-vm || fail "cannot mount the run dir"
for d in proc sys dev; do mount --move "/$d" "/root/$d"; done
exec switch_root /root /bin/bash /run/meshgate-vm/boot.sh
