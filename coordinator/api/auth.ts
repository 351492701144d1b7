// Who is calling: admin calls carry an API key (or come over the local
// socket), agent calls carry a machine-key signature.
import type * as grpc from '@grpc/grpc-js';
import { sha256 } from '../../proto/keys.js';
import {
  SIG_MACHINE_KEY,
  SIG_NODE_ID,
  SIG_NONCE,
  SIG_SIGNATURE,
  SIG_TIMESTAMP,
  verifyCallSignature,
} from '../../proto/signing.js';
import { unauthenticated } from '../state/errors.js';
import type { NodeRecord } from '../state/records.js';
import type { State } from '../state/state.js';
import { type AdminContext, GLOBAL_SCOPE } from './scope.js';

export const LOCAL_ACTOR = 'local-socket';

export async function adminActor(
  state: State,
  authorization: string | undefined,
  local: boolean,
): Promise<AdminContext> {
  if (local) return { actor: LOCAL_ACTOR, scope: GLOBAL_SCOPE };
  if (!authorization) throw unauthenticated('missing API key: pass --api-key or set MESHGATE_API_KEY');
  const m = /^Bearer\s+(\S+)$/i.exec(authorization);
  if (!m) throw unauthenticated('authorization must be "Bearer <api key>"');
  const key = await state.keys.authenticateApiKey(m[1]!);
  return { actor: `apikey:${key.id}`, scope: { projects: key.projects, readOnly: key.readOnly } };
}

export function header(md: grpc.Metadata, name: string): string | undefined {
  const v = md.get(name)[0];
  return typeof v === 'string' ? v : undefined;
}

export interface VerifierOptions {
  clockSkewMs: number;
  now?: () => number;
}

/** Checks signed agent calls: signature, clock window, one use per nonce. */
export class CallVerifier {
  private readonly seen = new Map<string, number>();
  private readonly now: () => number;
  private lastSweep = 0;

  constructor(
    private readonly state: State,
    private readonly opts: VerifierOptions,
  ) {
    this.now = opts.now ?? Date.now;
  }

  /** For Register: proves the caller holds the machine key in the request. */
  verifyRegister(md: grpc.Metadata, method: string, body: Uint8Array, machineKey: Uint8Array): void {
    this.check(md, method, body, '', machineKey);
  }

  /** For every later call: returns the node the signature belongs to. */
  verifyNode(md: grpc.Metadata, method: string, body: Uint8Array): NodeRecord {
    const nodeId = header(md, SIG_NODE_ID) ?? '';
    const node = nodeId ? this.state.getNode(nodeId) : undefined;
    if (!node) throw unauthenticated('unknown node: it was deleted or never registered; register again');
    this.check(md, method, body, nodeId, Buffer.from(node.machineKey, 'hex'));
    if (this.state.isExpired(node))
      throw unauthenticated(`node ${node.name} has expired; register again with a new auth key`);
    return node;
  }

  private check(
    md: grpc.Metadata,
    method: string,
    body: Uint8Array,
    nodeId: string,
    machineKey: Uint8Array,
  ): void {
    const ts = Number(header(md, SIG_TIMESTAMP));
    const nonce = header(md, SIG_NONCE) ?? '';
    const sig = header(md, SIG_SIGNATURE) ?? '';
    const claimedKey = header(md, SIG_MACHINE_KEY) ?? '';
    if (!Number.isFinite(ts) || !/^[0-9a-f]{32}$/.test(nonce) || !sig)
      throw unauthenticated('call is not signed');
    if (claimedKey !== Buffer.from(machineKey).toString('hex'))
      throw unauthenticated('call signed with another machine key');
    const now = this.now();
    if (Math.abs(now - ts) > this.opts.clockSkewMs) {
      throw unauthenticated(
        `call timestamp is ${Math.round((ts - now) / 1000)}s off the coordinator's clock; fix the clock (NTP)`,
      );
    }
    const call = { method, nodeId, timestamp: ts, nonce, bodyHash: sha256(body) };
    if (!verifyCallSignature(call, sig, machineKey)) throw unauthenticated('bad call signature');
    const key = `${claimedKey}:${nonce}`;
    this.sweep(now);
    if (this.seen.has(key)) throw unauthenticated('replayed call (nonce already used)');
    this.seen.set(key, ts + this.opts.clockSkewMs);
  }

  private sweep(now: number): void {
    if (now - this.lastSweep < 10_000) return;
    this.lastSweep = now;
    for (const [k, until] of this.seen) if (until < now) this.seen.delete(k);
  }
}

/**
 * "1.2.3.4" from grpc-js peer strings like "1.2.3.4:5678", "[::1]:5678" or
 * "ipv4:…", and from socket addresses; an IPv4-mapped IPv6 address is its
 * IPv4 address, so one client has one name in every log line.
 */
export function peerAddress(peer: string): string {
  const p = peer.replace(/^ipv[46]:/, '');
  const v6 = /^\[([^\]]+)\]:\d+$/.exec(p);
  const v4 = /^([^:]+):\d+$/.exec(p);
  const address = v6 ? v6[1]! : v4 ? v4[1]! : p;
  return address.replace(/^::ffff:(\d+\.\d+\.\d+\.\d+)$/i, '$1');
}
