# PID 1 in the guest's root (the host's files under an overlay): the usual
# mounts, the network from config, then a control loop that runs the host's
# scripts one at a time over the "ctl" virtio port. Powers off when the host
# closes the port or the loop ends.
set -u
RUN=/run/meshgate-vm
# shellcheck disable=SC1091
. "$RUN/config"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
off() {
  sync
  echo o > /proc/sysrq-trigger
  sleep 10
}
mkdir -p /dev/pts /dev/shm /run/sshd /run/lock
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
ln -sf /proc/self/fd /dev/fd
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname "$VM_HOSTNAME"
ip link set lo up
ip addr add "$VM_ADDRESS" dev eth0
ip link set eth0 up
ip route add default via "$VM_GATEWAY"
port=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = ctl ] && port=/dev/${p##*/}
done
[ -n "$port" ] || { echo "meshgate-vm: no ctl port" > /dev/hvc0; off; }
echo "meshgate-vm: ready $(cut -d' ' -f1 /proc/uptime)s" > /dev/hvc0
# One request per line: ID TAB base64(bash script). One answer per line:
# ID TAB exit status TAB base64(stdout and stderr). Scripts that leave
# something running must send its output elsewhere, or the answer waits for it.
exec 3<>"$port"
while IFS=$'\t' read -r id script <&3; do
  printf '%s' "$script" | base64 -d > /run/meshgate-vm-script
  out=$(cd / && bash /run/meshgate-vm-script 2>&1 < /dev/null)
  rc=$?
  printf '%s\t%s\t%s\n' "$id" "$rc" "$(printf '%s' "$out" | base64 -w0)" >&3
done
off
