// Parses `wg show IF dump`. The dump carries the interface's private key and the peers' preshared
// keys; both are dropped here, so no secret travels further than this function.
import { normalizeCidr } from './cidr.js';

export interface ActualPeer {
  publicKey: string;
  hasPresharedKey: boolean;
  /** `ip:port` or `[ip6]:port`, as WireGuard last saw it; null before the first packet or setting. */
  endpoint: string | null;
  /** Normalized prefixes (see normalizeCidr). */
  allowedIps: string[];
  /** Unix seconds of the last completed handshake; 0 = never. */
  latestHandshake: number;
  rxBytes: number;
  txBytes: number;
  /** Seconds; 0 = off. */
  persistentKeepalive: number;
}

export interface ActualInterface {
  /** null while no private key is set. */
  publicKey: string | null;
  listenPort: number;
  fwmark: number | null;
  peers: ActualPeer[];
}

export class DumpParseError extends Error {
  constructor(line: number, reason: string) {
    super(`unexpected output of wg show dump, line ${line}: ${reason}`);
    this.name = 'DumpParseError';
  }
}

const NONE = '(none)';

export function parseDump(text: string): ActualInterface {
  const lines = text.split('\n').filter((l) => l.length > 0);
  const head = lines[0]?.split('\t');
  if (head?.length !== 4) throw new DumpParseError(1, 'expected 4 interface fields');
  const [, publicKey, listenPort, fwmark] = head as [string, string, string, string];
  return {
    publicKey: publicKey === NONE ? null : publicKey,
    listenPort: toInt(listenPort, 1),
    fwmark: fwmark === 'off' ? null : toInt(fwmark, 1),
    peers: lines.slice(1).map((line, i) => parsePeer(line, i + 2)),
  };
}

function parsePeer(line: string, n: number): ActualPeer {
  const f = line.split('\t');
  if (f.length !== 8) throw new DumpParseError(n, 'expected 8 peer fields');
  const [publicKey, psk, endpoint, allowed, handshake, rx, tx, keepalive] = f as [
    string,
    string,
    string,
    string,
    string,
    string,
    string,
    string,
  ];
  return {
    publicKey,
    hasPresharedKey: psk !== NONE,
    endpoint: endpoint === NONE ? null : endpoint,
    allowedIps: allowed === NONE ? [] : allowed.split(',').map(normalizeCidr),
    latestHandshake: toInt(handshake, n),
    rxBytes: toInt(rx, n),
    txBytes: toInt(tx, n),
    persistentKeepalive: keepalive === 'off' ? 0 : toInt(keepalive, n),
  };
}

function toInt(text: string, line: number): number {
  if (!/^\d+$/.test(text)) throw new DumpParseError(line, `not a number: ${JSON.stringify(text)}`);
  return Number(text);
}
