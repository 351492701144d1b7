#!/bin/sh
# Joins this machine to the meshgate mesh at provisioning. Safe to run at every
# boot: what is installed and unchanged is left alone, a local agent.yaml is
# kept, and once the machine has joined, its identity lives in the agent's
# state dir, so a spent single-use auth key does no harm.
#
# Usually served by the coordinator itself and run as:
#   curl -fsSL -k --pinnedpubkey sha256//BASE64 https://COORD:7480/install.sh |
#     MESHGATE_AUTH_KEY=mgkey_auth_… sh -s -- --coordinator grpcs://COORD:7443 \
#       --fingerprint sha256:HEX --release-key ed25519:BASE64
# (BASE64 of the pin: meshgate coordinator fingerprint --curl.)
#
# Options:
#   --coordinator URL       grpcs://HOST:PORT of the coordinator
#   --fingerprint sha256:H  pins the coordinator's TLS key (gRPC and HTTPS)
#   --release-key KEY       ed25519:BASE64 from "meshgate release keygen"; required
#   --releases-url URL      where releases are served (default https://COORD_HOST:7480)
#   --version V             release to install (default: the desired version of the
#                           auth key's project, else the newest one served)
#   --auth-key-file F       file with the auth key (or MESHGATE_AUTH_KEY in the environment)
#   --hostname NAME         node name (default: machineuuid from the metal install.yaml,
#                           else the host name)
#   --interface NAME        WireGuard interface (default meshgate0)
#   --lockdown-ssh BOOL     true or false (default true)
#   --advertise-tags T,T    tags to ask for
#   --state-dir DIR         agent state dir (default /var/lib/meshgate-agent)
#   --no-start              write everything, but do not touch systemd
#   --auto-update           the agent installs the releases the coordinator names
#                           (versions set) itself, checked against --release-key
# metal-stack: /etc/metal/install.yaml with vpn: {address, auth_key} and
# machineuuid is read when present; options win over it.
#
# Paths can be moved (for tests or images) with MESHGATE_OPT_DIR (/opt/meshgate),
# MESHGATE_BIN_DIR (/usr/local/bin), MESHGATE_ETC_DIR (/etc/meshgate),
# MESHGATE_UNIT_DIR (/etc/systemd/system), MESHGATE_METAL_INSTALL
# (/etc/metal/install.yaml).
set -eu
umask 077

opt_dir=${MESHGATE_OPT_DIR:-/opt/meshgate}
bin_dir=${MESHGATE_BIN_DIR:-/usr/local/bin}
etc_dir=${MESHGATE_ETC_DIR:-/etc/meshgate}
unit_dir=${MESHGATE_UNIT_DIR:-/etc/systemd/system}
metal_install=${MESHGATE_METAL_INSTALL:-/etc/metal/install.yaml}
apt_tries=${MESHGATE_APT_TRIES:-30}
key_file=$etc_dir/authkey
config=$etc_dir/agent.yaml

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() {
  say "$*"
  exit 1
}

# The auth key goes straight into its file and out of the environment, so no
# command started below (apt-get, curl, node, systemctl) inherits it.
install -d -m 0700 "$etc_dir"
key_changed=no
key_given=no
write_key() { # stdin: the key
  tmp_key=$(mktemp "$etc_dir/.authkey.XXXXXX")
  cat >"$tmp_key"
  if [ ! -s "$tmp_key" ]; then
    rm -f "$tmp_key"
    return 0
  fi
  key_given=yes
  if cmp -s "$tmp_key" "$key_file"; then
    rm -f "$tmp_key"
  else
    chmod 0600 "$tmp_key"
    mv -f "$tmp_key" "$key_file"
    key_changed=yes
  fi
}
if [ -n "${MESHGATE_AUTH_KEY:-}" ]; then
  write_key <<KEY
$MESHGATE_AUTH_KEY
KEY
fi
unset MESHGATE_AUTH_KEY

coordinator=
fingerprint=
release_key=
releases_url=
version=
hostname=
interface=meshgate0
lockdown=true
tags=
state_dir=
start=yes
auto_update=no
releases_url_given=no
while [ $# -gt 0 ]; do
  case $1 in
  --no-start)
    start=no
    shift
    continue
    ;;
  --auto-update)
    auto_update=yes
    shift
    continue
    ;;
  --*) [ $# -ge 2 ] || die "$1 needs a value" ;;
  *) die "unknown argument $1 (options start with --)" ;;
  esac
  case $1 in
  --coordinator) coordinator=$2 ;;
  --fingerprint) fingerprint=$2 ;;
  --release-key) release_key=$2 ;;
  --releases-url)
    releases_url=${2%/}
    releases_url_given=yes
    ;;
  --version) version=$2 ;;
  --auth-key-file)
    [ -r "$2" ] || die "cannot read $2"
    write_key <"$2"
    ;;
  --auth-key) die '--auth-key would put the key in argv, where every user sees it: use --auth-key-file or MESHGATE_AUTH_KEY' ;;
  --hostname) hostname=$2 ;;
  --interface) interface=$2 ;;
  --lockdown-ssh) lockdown=$2 ;;
  --advertise-tags) tags=$2 ;;
  --state-dir) state_dir=$2 ;;
  *) die "unknown option $1" ;;
  esac
  shift 2
done

# metal-stack's install.yaml: vpn.address, vpn.auth_key, machineuuid.
metal_value() { # $1: key under vpn: or a top-level key with $2=top
  awk -v want="$1" -v top="${2:-}" '
    /^[^ \t#]/ { invpn = ($0 ~ /^vpn:[ \t]*$/) }
    (top == "" && invpn && $1 == want ":") || (top != "" && $0 ~ "^" want ":") {
      sub(/^[ \t]*[^:]*:[ \t]*/, ""); sub(/[ \t]+#.*$/, ""); gsub(/^["\047]|["\047]$/, ""); print; exit
    }' "$metal_install"
}
if [ -r "$metal_install" ]; then
  [ -n "$coordinator" ] || coordinator=$(metal_value address)
  [ -n "$hostname" ] || hostname=$(metal_value machineuuid top)
  if [ "$key_given" = no ]; then
    metal_value auth_key >"$etc_dir/.metal-authkey"
    write_key <"$etc_dir/.metal-authkey"
    rm -f "$etc_dir/.metal-authkey"
  fi
fi

case $lockdown in
true | yes | on | 1) lockdown=true ;;
false | no | off | 0) lockdown=false ;;
*) die "--lockdown-ssh must be true or false, not $lockdown" ;;
esac
[ -n "$coordinator" ] || die 'give --coordinator grpcs://HOST:PORT (or vpn.address in install.yaml)'
[ -n "$release_key" ] || die 'give --release-key ed25519:BASE64 (printed by meshgate release keygen)'
case $release_key in ed25519:*) ;; *) die '--release-key must start with ed25519:' ;; esac
if [ -n "$fingerprint" ]; then
  printf '%s' "$fingerprint" | grep -Eqi '^sha256:[0-9a-f]{64}$' ||
    die '--fingerprint must be sha256: followed by 64 hex digits'
fi
semver='^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$'
if [ -n "$version" ]; then
  printf '%s' "$version" | grep -Eq "$semver" || die "--version $version is not a semantic version"
fi
printf '%s' "$interface" | grep -Eq '^[A-Za-z0-9_.-]{1,15}$' || die "invalid interface name $interface"
if [ -n "$hostname" ]; then
  printf '%s' "$hostname" | grep -Eq '^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$' || die "invalid node name $hostname"
fi
if [ -z "$releases_url" ]; then
  host=$(printf '%s' "$coordinator" | sed -E 's#^[a-z]+://##; s#/.*$##; s#:[0-9]+$##')
  releases_url=https://$host:7480
fi

# ---- tools: only what is missing is installed, so a boot without network works

missing=
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v curl >/dev/null 2>&1 || missing="$missing curl ca-certificates"
command -v wg >/dev/null 2>&1 || missing="$missing wireguard-tools"
command -v nft >/dev/null 2>&1 || missing="$missing nftables"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
if [ ! -d /sys/module/wireguard ] && ! modinfo wireguard >/dev/null 2>&1; then
  command -v wireguard-go >/dev/null 2>&1 || missing="$missing wireguard-go"
fi
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null 2>&1 || die "install$missing first (no apt-get here)"
  say "installing$missing"
  i=0
  # At first boot the network may still be coming up: retry.
  until DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null; do
    i=$((i + 1))
    [ "$i" -lt "$apt_tries" ] || die "apt-get failed $i times; is the network up?"
    say "apt-get failed, retrying in 5s ($i/$apt_tries)"
    sleep 5
  done
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 20 ] ||
  die "meshgate needs Node >= 20, this distribution has $(node --version): install nodejs 20 or newer (e.g. from NodeSource) and run again"

# ---- release: download, verify signature and sha256, install side by side

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fetch() { # $1: path under the releases URL, $2: output file, then more curl arguments
  url=$releases_url$1
  out=$2
  shift 2
  if [ -n "$fingerprint" ]; then
    pin=$(node -e 'process.stdout.write(Buffer.from(process.argv[1].slice(7), "hex").toString("base64"))' "$fingerprint")
    set -- "$@" -k --pinnedpubkey "sha256//$pin"
  fi
  curl -fsS --proto =https --retry 5 --retry-connrefused --retry-delay 2 --max-time 120 "$@" -o "$out" "$url"
}

# Checks the manifest's Ed25519 signature against the release key, then
# (with an artifact) its size and sha256. Prints "FILE SHA256". The same
# canonical form as release/manifest.ts: every field but the signature,
# keys sorted, no whitespace.
verify() { # $1: manifest, $2: version, $3: artifact (optional)
  node -e '
const fs = require("fs"), crypto = require("crypto");
const [, manifestPath, key, want, artifact] = process.argv;
const fail = (m) => { process.stderr.write(`install.sh: ${m}\n`); process.exit(1); };
let m;
try { m = JSON.parse(fs.readFileSync(manifestPath, "utf8")); } catch { fail("the release manifest is not JSON"); }
if (!m || typeof m !== "object" || typeof m.signature !== "string") fail("the release manifest is not signed");
const raw = Buffer.from(key.slice(8), "base64");
if (raw.length !== 32) fail("--release-key must be ed25519: followed by 32 bytes in base64");
const pub = crypto.createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: raw.toString("base64url") }, format: "jwk" });
const canonical = JSON.stringify(Object.fromEntries(Object.entries(m).filter(([k]) => k !== "signature").sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))));
if (!crypto.verify(null, Buffer.from(canonical), pub, Buffer.from(m.signature, "base64")))
  fail(`release ${want}: the manifest signature does not match the release key`);
if (m.format !== "meshgate-release/1" || m.version !== want || m.file !== `meshgate-${want}.mjs` || !/^[0-9a-f]{64}$/.test(m.sha256))
  fail(`the signed manifest is not the one of meshgate ${want}`);
const needs = Number(String(m.node).replace(/^>=/, ""));
if (Number(process.versions.node.split(".")[0]) < needs) fail(`meshgate ${want} needs Node ${m.node}, this is ${process.version}`);
if (artifact) {
  const bytes = fs.readFileSync(artifact);
  if (bytes.length !== m.size) fail(`release ${want}: the artifact has ${bytes.length} bytes, the manifest says ${m.size}`);
  const sha = crypto.createHash("sha256").update(bytes).digest("hex");
  if (sha !== m.sha256) fail(`release ${want}: the artifact sha256 ${sha} does not match the signed manifest`);
}
process.stdout.write(`${m.file} ${m.sha256}\n`);
' "$1" "$release_key" "$2" ${3:+"$3"}
}

current_version=
[ -L "$opt_dir/current" ] && current_version=$(basename "$(readlink "$opt_dir/current")")
keep_newer=no
# An agent with autoUpdate moves to new releases itself, under the
# coordinator's rollout control (--max-unavailable, halts): a boot does not
# jump ahead of it.
if [ -z "$version" ] && [ -n "$current_version" ] && [ -f "$opt_dir/$current_version/meshgate.mjs" ] &&
  [ -f "$config" ] && grep -Eq '^autoUpdate:[[:space:]]*true' "$config"; then
  version=$current_version
fi
if [ -z "$version" ] && [ -s "$key_file" ] &&
  fetch /releases/desired "$work/desired.json" -H 'content-type: text/plain' --data-binary "@$key_file" 2>/dev/null; then
  # The version set for this key's project (and tags) with "meshgate versions set".
  desired=$(node -e 'const d = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
if (typeof d.version === "string" && d.served) process.stdout.write(`${d.version} ${d.allowDowngrade === true}`)' "$work/desired.json")
  if [ -n "$desired" ]; then
    version=${desired% *}
    printf '%s' "$version" | grep -Eq "$semver" || die "$releases_url names an invalid desired release"
    [ "${desired#* }" = true ] || keep_newer=yes
  fi
fi
if [ -z "$version" ]; then
  if fetch /releases/ "$work/index.json"; then
    version=$(node -e 'const v = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).latest; process.stdout.write(typeof v === "string" ? v : "")' "$work/index.json")
    [ -n "$version" ] || die "$releases_url serves no release"
    printf '%s' "$version" | grep -Eq "$semver" || die "$releases_url names an invalid latest release"
    keep_newer=yes
  elif [ -n "$current_version" ]; then
    say "cannot reach $releases_url; keeping meshgate $current_version"
    version=$current_version
  else
    die "cannot reach $releases_url to download meshgate"
  fi
fi
# Not back to an older version that a later install or update put in place,
# unless asked for (--version, or a desired version that allows a downgrade).
if [ "$keep_newer" = yes ] && [ -n "$current_version" ] && [ -f "$opt_dir/$current_version/meshgate.mjs" ] &&
  node -e 'const p = (v) => v.split(/[-+]/)[0].split(".").map(Number); const [a, b] = process.argv.slice(1).map(p);
process.exit((a[0] - b[0] || a[1] - b[1] || a[2] - b[2]) > 0 ? 0 : 1)' "$current_version" "$version"; then
  version=$current_version
fi

dest=$opt_dir/$version
installed=no
if [ -f "$dest/manifest.json" ] && [ -f "$dest/meshgate.mjs" ] && verify "$dest/manifest.json" "$version" "$dest/meshgate.mjs" >/dev/null 2>&1; then
  installed=yes
fi
changed=no
if [ "$installed" = no ]; then
  fetch "/releases/$version/manifest.json" "$work/manifest.json" || die "cannot download release $version from $releases_url"
  described=$(verify "$work/manifest.json" "$version") || exit 1
  set -- $described
  fetch "/releases/$version/$1" "$work/meshgate.mjs" || die "cannot download release $version from $releases_url"
  verify "$work/manifest.json" "$version" "$work/meshgate.mjs" >/dev/null
  install -d -m 0755 "$opt_dir"
  rm -rf "$opt_dir/.$version.new"
  install -d -m 0755 "$opt_dir/.$version.new"
  install -m 0755 "$work/meshgate.mjs" "$opt_dir/.$version.new/meshgate.mjs"
  install -m 0644 "$work/manifest.json" "$opt_dir/.$version.new/manifest.json"
  rm -rf "$dest"
  mv "$opt_dir/.$version.new" "$dest"
  say "installed meshgate $version in $dest"
  changed=yes
fi
if [ "$current_version" != "$version" ]; then
  ln -sfn "$version" "$opt_dir/.current.new"
  mv -T "$opt_dir/.current.new" "$opt_dir/current"
  changed=yes
fi
if [ "$(readlink "$bin_dir/meshgate" 2>/dev/null || true)" != "$opt_dir/current/meshgate.mjs" ]; then
  install -d -m 0755 "$bin_dir"
  ln -sfn "$opt_dir/current/meshgate.mjs" "$bin_dir/meshgate"
  changed=yes
fi

# ---- configuration: written only when absent, so local edits stay

if [ ! -e "$config" ]; then
  {
    printf 'coordinator: %s\n' "$coordinator"
    [ -z "$fingerprint" ] || printf 'fingerprint: %s\n' "$fingerprint"
    printf 'authKeyFile: %s\n' "$key_file"
    [ -z "$hostname" ] || printf 'hostname: %s\n' "$hostname"
    printf 'interface: %s\n' "$interface"
    printf 'lockdownSsh: %s\n' "$lockdown"
    [ -z "$tags" ] || printf 'advertiseTags: [%s]\n' "$tags"
    [ -z "$state_dir" ] || printf 'stateDir: %s\n' "$state_dir"
    if [ "$auto_update" = yes ]; then
      printf 'autoUpdate: true\nreleaseKey: %s\n' "$release_key"
      [ "$opt_dir" = /opt/meshgate ] || printf 'installPrefix: %s\n' "$opt_dir"
      [ "$releases_url_given" = no ] || printf 'releasesUrl: %s\n' "$releases_url"
    fi
  } >"$work/agent.yaml"
  install -m 0600 "$work/agent.yaml" "$config"
  say "wrote $config"
  changed=yes
fi

cat >"$work/unit" <<UNIT
[Unit]
Description=meshgate agent: WireGuard mesh node
Wants=network-online.target
After=network-online.target nftables.service
# A release that cannot start is restarted until the update watchdog rolls it back.
StartLimitIntervalSec=0

[Service]
Type=simple
# Root: the agent creates the WireGuard interface, routes and its nftables table.
User=root
EnvironmentFile=-/etc/default/meshgate-agent
ExecStart=$bin_dir/meshgate agent --config $config
# Also after exit status 75: the agent restarts into a release it installed (--auto-update).
Restart=always
RestartSec=2
# Only the agent is signalled: it stops what it started itself. A self-update
# leaves wireguard-go (the interface and its peers) and the update watchdog
# running while the next release starts; the firewall table always stays.
KillMode=process
TimeoutStopSec=15

StateDirectory=meshgate-agent
StateDirectoryMode=0700
RuntimeDirectory=meshgate wireguard
RuntimeDirectoryMode=0755
# wireguard-go's socket must outlive a restart of the agent.
RuntimeDirectoryPreserve=yes
# --auto-update unpacks releases next to each other here.
ReadWritePaths=-$opt_dir
UMask=0077

NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_DAC_OVERRIDE CAP_CHOWN CAP_FOWNER
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
UNIT
unit=$unit_dir/meshgate-agent.service
unit_changed=no
if ! cmp -s "$work/unit" "$unit"; then
  install -d -m 0755 "$unit_dir"
  install -m 0644 "$work/unit" "$unit"
  unit_changed=yes
  changed=yes
fi

if [ "$start" = yes ]; then
  if [ -d /run/systemd/system ]; then
    [ "$unit_changed" = no ] || systemctl daemon-reload
    systemctl enable meshgate-agent.service >/dev/null 2>&1
    if [ "$changed" = yes ] || [ "$key_changed" = yes ]; then
      systemctl restart meshgate-agent.service
    else
      systemctl start meshgate-agent.service
    fi
  else
    say "systemd is not running: start the agent with $bin_dir/meshgate agent --config $config"
  fi
fi
[ "$changed" = yes ] || say "meshgate $version is installed and configured; nothing changed"
