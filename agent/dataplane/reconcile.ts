// Computes the smallest `wg set` that turns the actual interface into the desired one. Peers that are
// left alone keep their session: WireGuard only drops a handshake when a peer is removed, so an
// existing peer is never removed and re-added, only patched field by field.
import { decodeWgKey } from '../../proto/keys.js';
import { formatIp, normalizeCidr, parseIp } from './cidr.js';
import type { ActualInterface, ActualPeer } from './dump.js';

export interface DesiredPeer {
  publicKey: string;
  allowedIps: string[];
  endpoint?: string;
  persistentKeepalive?: number;
}

export interface DesiredInterface {
  privateKeyFile: string;
  /** 0 lets WireGuard pick a port and keeps whatever port the interface already has. */
  listenPort: number;
  peers: DesiredPeer[];
}

/**
 * `ifUnset`: only give a peer an endpoint when it has none, so WireGuard's roaming (which follows
 * the address a peer's packets really come from, e.g. behind NAT) is not undone on every netmap.
 * `force`: also replace a differing endpoint, for moving on to another endpoint candidate.
 */
export type EndpointPolicy = 'force' | 'ifUnset';

export type PeerOp =
  | { kind: 'remove'; publicKey: string }
  | { kind: 'add'; publicKey: string; allowedIps: string[]; endpoint?: string; persistentKeepalive?: number }
  | {
      kind: 'update';
      publicKey: string;
      allowedIps?: string[];
      endpoint?: string;
      persistentKeepalive?: number;
    };

export interface PlanOptions {
  endpointPolicy?: EndpointPolicy;
}

export class InvalidPeerError extends Error {
  constructor(publicKey: string, reason: string) {
    super(`invalid peer ${publicKey.slice(0, 60)}: ${reason}`);
    this.name = 'InvalidPeerError';
  }
}

/** Upper bound for one `wg set` argv; well below Linux's ARG_MAX so 10,000 peers still go through. */
export const DEFAULT_MAX_ARG_BYTES = 64 * 1024;

export function planPeers(desired: DesiredPeer[], actual: ActualPeer[], options: PlanOptions = {}): PeerOp[] {
  const policy = options.endpointPolicy ?? 'ifUnset';
  const wanted = new Map<string, DesiredPeer>();
  for (const peer of desired) {
    const clean = validatePeer(peer);
    if (wanted.has(clean.publicKey)) throw new InvalidPeerError(peer.publicKey, 'listed twice');
    wanted.set(clean.publicKey, clean);
  }
  const present = new Map(actual.map((p) => [p.publicKey, p]));

  const removes: PeerOp[] = actual
    .filter((p) => !wanted.has(p.publicKey))
    .map((p) => ({ kind: 'remove', publicKey: p.publicKey }));
  const updates: PeerOp[] = [];
  const adds: PeerOp[] = [];
  for (const peer of wanted.values()) {
    const have = present.get(peer.publicKey);
    if (!have) {
      adds.push({
        kind: 'add',
        publicKey: peer.publicKey,
        allowedIps: peer.allowedIps,
        ...(peer.endpoint !== undefined && { endpoint: peer.endpoint }),
        ...(peer.persistentKeepalive ? { persistentKeepalive: peer.persistentKeepalive } : {}),
      });
      continue;
    }
    const op = diffPeer(peer, have, policy);
    if (op) updates.push(op);
  }
  return [...removes, ...updates, ...adds];
}

function diffPeer(want: DesiredPeer, have: ActualPeer, policy: EndpointPolicy): PeerOp | null {
  const op: PeerOp & { kind: 'update' } = { kind: 'update', publicKey: want.publicKey };
  let changed = false;
  if (!sameSet(want.allowedIps, have.allowedIps)) {
    op.allowedIps = want.allowedIps;
    changed = true;
  }
  const endpointDiffers = want.endpoint !== undefined && want.endpoint !== normalizeEndpoint(have.endpoint);
  if (endpointDiffers && (have.endpoint === null || policy === 'force')) {
    op.endpoint = want.endpoint;
    changed = true;
  }
  const keepalive = want.persistentKeepalive ?? 0;
  if (keepalive !== have.persistentKeepalive) {
    op.persistentKeepalive = keepalive;
    changed = true;
  }
  return changed ? op : null;
}

function sameSet(a: string[], b: string[]): boolean {
  const sb = new Set(b);
  return a.length === sb.size && a.every((x) => sb.has(x));
}

function validatePeer(peer: DesiredPeer): DesiredPeer {
  try {
    decodeWgKey(peer.publicKey);
  } catch {
    throw new InvalidPeerError(peer.publicKey, 'not a WireGuard public key');
  }
  const ka = peer.persistentKeepalive;
  if (ka !== undefined && !(Number.isInteger(ka) && ka >= 0 && ka <= 65535)) {
    throw new InvalidPeerError(peer.publicKey, `persistent keepalive ${ka} is not 0..65535 seconds`);
  }
  let allowedIps: string[];
  try {
    allowedIps = [...new Set(peer.allowedIps.map(normalizeCidr))];
  } catch (e) {
    throw new InvalidPeerError(peer.publicKey, (e as Error).message);
  }
  const endpoint = peer.endpoint === undefined ? undefined : normalizeEndpoint(peer.endpoint);
  if (endpoint === null) throw new InvalidPeerError(peer.publicKey, `bad endpoint ${peer.endpoint}`);
  return {
    publicKey: peer.publicKey,
    allowedIps,
    ...(endpoint !== undefined && { endpoint }),
    ...(ka !== undefined && { persistentKeepalive: ka }),
  };
}

/** `ip:port` / `[ip6]:port` in canonical form, a `host:port` unchanged, or null when malformed. */
export function normalizeEndpoint(text: string | null): string | null {
  if (text === null) return null;
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  if (!m || Number(m[3]) > 65535) return null;
  const host = (m[1] ?? m[2])!;
  const ip = parseIp(host);
  if (ip) return ip.family === 4 ? `${formatIp(4, ip.bytes)}:${m[3]}` : `[${formatIp(6, ip.bytes)}]:${m[3]}`;
  return m[2] && /^[A-Za-z0-9.-]{1,253}$/.test(host) ? text : null;
}

/** Arguments that follow `wg set IF` for interface-wide settings that differ. */
export function planInterfaceArgs(
  desired: Pick<DesiredInterface, 'privateKeyFile' | 'listenPort'>,
  desiredPublicKey: string,
  actual: ActualInterface,
): string[] {
  const args: string[] = [];
  if (actual.publicKey !== desiredPublicKey) args.push('private-key', desired.privateKeyFile);
  if (desired.listenPort !== 0 && desired.listenPort !== actual.listenPort) {
    args.push('listen-port', String(desired.listenPort));
  }
  return args;
}

export function peerArgs(op: PeerOp): string[] {
  const args = ['peer', op.publicKey];
  if (op.kind === 'remove') return [...args, 'remove'];
  if (op.endpoint !== undefined) args.push('endpoint', op.endpoint);
  if (op.persistentKeepalive !== undefined) args.push('persistent-keepalive', String(op.persistentKeepalive));
  // A new peer starts without allowed IPs; an update replaces the whole list, possibly with none.
  if (op.allowedIps !== undefined && (op.kind === 'update' || op.allowedIps.length > 0)) {
    args.push('allowed-ips', op.allowedIps.join(','));
  }
  return args;
}

/**
 * Full argv lists for `wg`, in order: the interface settings go with the first call, peer changes
 * are split so that no call's argv exceeds `maxArgBytes`.
 */
export function wgSetCommands(
  iface: string,
  interfaceArgs: string[],
  ops: PeerOp[],
  maxArgBytes = DEFAULT_MAX_ARG_BYTES,
): string[][] {
  const size = (args: string[]) => args.reduce((n, a) => n + Buffer.byteLength(a) + 1, 0);
  const commands: string[][] = [];
  let current = ['set', iface, ...interfaceArgs];
  let bytes = size(current);
  let dirty = interfaceArgs.length > 0;
  for (const op of ops) {
    const args = peerArgs(op);
    const n = size(args);
    if (dirty && bytes + n > maxArgBytes) {
      commands.push(current);
      current = ['set', iface];
      bytes = size(current);
    }
    current.push(...args);
    bytes += n;
    dirty = true;
  }
  if (dirty) commands.push(current);
  return commands;
}
