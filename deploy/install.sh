#!/bin/sh
# Joins this machine to the mesh at provisioning. Safe to run at every boot:
# once the machine has joined, its identity lives in the agent's state dir
# and the (possibly spent) auth key is not needed again.
#   MESHGATE_AUTH_KEY=mgkey-auth-… MESHGATE_COORDINATOR=grpcs://… MESHGATE_FINGERPRINT=sha256:… ./install.sh
set -eu
: "${MESHGATE_COORDINATOR:?set MESHGATE_COORDINATOR=grpcs://HOST:PORT}"
: "${MESHGATE_FINGERPRINT:?set MESHGATE_FINGERPRINT=sha256:HEX (meshgate coordinator fingerprint)}"

apt-get install -y --no-install-recommends wireguard-tools wireguard-go nftables iproute2 >/dev/null

install -d -m 0700 /etc/meshgate
if [ -n "${MESHGATE_AUTH_KEY:-}" ]; then
  umask 077
  printf '%s\n' "$MESHGATE_AUTH_KEY" > /etc/meshgate/authkey
fi
cat > /etc/meshgate/agent.yaml <<YAML
coordinator: ${MESHGATE_COORDINATOR}
fingerprint: ${MESHGATE_FINGERPRINT}
authKeyFile: /etc/meshgate/authkey
interface: ${MESHGATE_INTERFACE:-meshgate0}
lockdownSsh: ${MESHGATE_LOCKDOWN_SSH:-true}
YAML
chmod 0600 /etc/meshgate/agent.yaml

install -m 0644 "$(dirname "$0")/meshgate-agent.service" /etc/systemd/system/meshgate-agent.service
systemctl daemon-reload
systemctl enable --now meshgate-agent.service
