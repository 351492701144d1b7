// Stand-ins for `ip`, `wg`, `nft` and `wireguard-go`, first on PATH, so the agent daemon runs its
// whole lifecycle in a unit test without touching the host's interfaces or ruleset. Each one logs
// its command line; `nft` keeps the one table it was given, as the kernel would, so a test can read
// what a firewall would hold, and `nft monitor` reports what a test says happened; `wg show IF dump`
// reports the peers a test gives it; `wireguard-go` only runs until it is signalled, so a test can
// see whether the agent ended it. The real tools are exercised by the end-to-end suite.
import {
  appendFileSync,
  chmodSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';

const LOG = 'echo "$(basename "$0") $*" >> "$(dirname "$0")/commands.log"';

const SCRIPTS: Record<string, string> = {
  nft: `${LOG}
d=$(dirname "$0")
case "$1" in
monitor) touch "$d/monitor"; exec tail -n0 -F --pid=$PPID "$d/monitor" 2>/dev/null ;;
-f)
  input=$(cat)
  case "$input" in
  *chain*) printf '%s\\n' "$input" > "$d/ruleset"; echo written >> "$d/ruleset.history" ;;
  *)
    [ -f "$d/refuse-removal" ] && { echo 'Error: Could not process rule: Operation not permitted' >&2; exit 1; }
    rm -f "$d/ruleset"; echo removed >> "$d/ruleset.history" ;;
  esac ;;
list)
  [ -f "$d/ruleset" ] || { echo 'Error: No such file or directory' >&2; exit 1; }
  cat "$d/ruleset" ;;
esac
`,
  ip: `${LOG}
case "$*" in
"link add "*) [ -f "$(dirname "$0")/no-wireguard" ] && { echo 'Error: Unknown device type.' >&2; exit 2; } ;;
*" addr show "*) echo '[{"flags":["UP"],"mtu":1280,"addr_info":[]}]' ;;
*" route show "*) echo '[]' ;;
esac
exit 0
`,
  // Stays up like wireguard-go in the foreground, until a signal ends it.
  'wireguard-go': `${LOG}
echo $$ > "$(dirname "$0")/wireguard-go.pid"
exec sleep 600
`,
  // `wg show IF listen-port` answers once a wireguard-go runs, as the real one does through its socket.
  wg: `${LOG}
d=$(dirname "$0")
case "$*" in
*" listen-port") kill -0 "$(cat "$d/wireguard-go.pid" 2>/dev/null)" 2>/dev/null || exit 1 ;;
*" dump")
  printf '(none)\\t(none)\\t0\\toff\\n'
  cat "$d/peers" 2>/dev/null ;;
esac
exit 0
`,
};

export interface FakeNetTools {
  /** Command lines run so far, e.g. `ip link del dev mgt0`. */
  commands(): string[];
  /** The nftables table as last written, or null when it was removed (or never written). */
  ruleset(): string | null;
  /** Every write of the table by the agent, in order: `written` or `removed`. */
  rulesetHistory(): string[];
  /** Someone else changes the table (null: removes it), and `nft monitor` reports it. */
  tamper(table: string | null): void;
  /** Peer lines of `wg show IF dump` (tab-separated, as WireGuard prints them). */
  setPeers(lines: string[][]): void;
  /** The process id of the last `wireguard-go` started. */
  wireguardGoPid(): number | null;
  /** Makes `nft` refuse to remove the table, as it does without CAP_NET_ADMIN. */
  refuseRemoval(on: boolean): void;
  /** Makes `ip link add` fail as on a kernel without WireGuard. */
  withoutWireGuard(on: boolean): void;
  /** Takes the stand-ins off PATH and removes them. */
  uninstall(): void;
}

export function installFakeNetTools(): FakeNetTools {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-fake-tools-'));
  for (const [name, body] of Object.entries(SCRIPTS)) {
    writeFileSync(join(dir, name), `#!/bin/sh\n${body}`);
    chmodSync(join(dir, name), 0o755);
  }
  const path = process.env.PATH;
  process.env.PATH = `${dir}${delimiter}${path ?? ''}`;
  const read = (file: string) => (existsSync(join(dir, file)) ? readFileSync(join(dir, file), 'utf8') : null);
  return {
    commands: () => (read('commands.log') ?? '').split('\n').filter(Boolean),
    ruleset: () => read('ruleset'),
    rulesetHistory: () => (read('ruleset.history') ?? '').split('\n').filter(Boolean),
    tamper(table) {
      if (table === null) rmSync(join(dir, 'ruleset'), { force: true });
      else writeFileSync(join(dir, 'ruleset'), table);
      appendFileSync(
        join(dir, 'monitor'),
        'delete table inet meshgate\n# new generation 2 by process 1 (nft)\n',
      );
    },
    setPeers(lines) {
      writeFileSync(join(dir, 'peers'), lines.map((l) => `${l.join('\t')}\n`).join(''));
    },
    wireguardGoPid: () => {
      const pid = read('wireguard-go.pid');
      return pid === null ? null : Number(pid);
    },
    refuseRemoval(on) {
      if (on) writeFileSync(join(dir, 'refuse-removal'), '');
      else rmSync(join(dir, 'refuse-removal'), { force: true });
    },
    withoutWireGuard(on) {
      if (on) writeFileSync(join(dir, 'no-wireguard'), '');
      else rmSync(join(dir, 'no-wireguard'), { force: true });
    },
    uninstall() {
      process.env.PATH = path;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
