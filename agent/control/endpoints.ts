// Endpoint candidates: what the agent reports about itself, and in which
// order it tries a peer's endpoints (same subnet first, then the rest).
import { networkInterfaces } from 'node:os';

export interface LocalAddress {
  address: string;
  family: 4 | 6;
  cidr: string;
}

/** Addresses worth reporting: not loopback, not link-local, not on the mesh interface. */
export function localAddresses(meshInterface: string): LocalAddress[] {
  const out: LocalAddress[] = [];
  for (const [name, addrs] of Object.entries(networkInterfaces())) {
    if (name === meshInterface || !addrs) continue;
    for (const a of addrs) {
      if (
        a.internal ||
        a.address.startsWith('fe80:') ||
        a.address.startsWith('100.64.') ||
        a.address.startsWith('fd7a:115c:a1e0:')
      )
        continue;
      if (!a.cidr) continue;
      out.push({ address: a.address, family: a.family === 'IPv4' ? 4 : 6, cidr: a.cidr });
    }
  }
  return out;
}

export function formatEndpoint(address: string, port: number): string {
  return address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`;
}

function ipv4ToInt(ip: string): number {
  return ip.split('.').reduce((n, o) => (n << 8) + Number(o), 0) >>> 0;
}

function sameSubnet(endpoint: string, locals: LocalAddress[]): boolean {
  const host = endpoint.replace(/:\d+$/, '');
  if (host.startsWith('[')) return false;
  return locals.some((l) => {
    if (l.family !== 4) return false;
    const bits = Number(l.cidr.split('/')[1]);
    const mask = bits === 0 ? 0 : (~0 << (32 - bits)) >>> 0;
    return (ipv4ToInt(host) & mask) === (ipv4ToInt(l.address) & mask);
  });
}

/** The first IPv4 endpoint on one of this host's own networks, as [address, port]. */
export function endpointOnLocalNetwork(
  endpoints: string[],
  locals: LocalAddress[],
): [string, number] | undefined {
  const e = endpoints.find((x) => !x.startsWith('[') && sameSubnet(x, locals));
  if (!e) return undefined;
  const i = e.lastIndexOf(':');
  return [e.slice(0, i), Number(e.slice(i + 1))];
}

/** Same-subnet candidates first, then the others in the coordinator's order; IPv4 before IPv6. */
export function orderCandidates(endpoints: string[], locals: LocalAddress[]): string[] {
  const v4 = endpoints.filter((e) => !e.startsWith('['));
  const v6 = endpoints.filter((e) => e.startsWith('['));
  return [...v4.filter((e) => sameSubnet(e, locals)), ...v4.filter((e) => !sameSubnet(e, locals)), ...v6];
}

export const RELAY = 'relay';

export interface PathInput {
  /** Direct candidates, best first. */
  candidates: string[];
  /** The endpoint WireGuard uses now (it follows roaming). */
  actual: string | null;
  lastHandshakeMs: number;
  rxBytes: number;
  /** Whether the coordinator relay can carry this peer's traffic. */
  relayAvailable: boolean;
  /** The local relay socket's endpoint, when one exists for this peer. */
  relayEndpoint: string | undefined;
}

export interface PathChoice {
  /** A direct endpoint, RELAY for the relay socket, or undefined for none yet. */
  endpoint: string | undefined;
  /** A short keepalive while probing, so packets flow even on an idle tunnel. */
  keepalive?: number;
  /**
   * Set when a probe starts: WireGuard sends a keepalive at once only when
   * the interval goes from off to on, so the caller turns it off first; with
   * `announce` it also asks the peer, over the relay, to probe at the same
   * moment, so that packets flow both ways through the NATs.
   */
  probeStarted?: { announce: boolean };
}

export interface PathTimings {
  /** Time a direct candidate gets before the next is tried. */
  trialMs: number;
  /** Time without a handshake over direct candidates before the relay is used. */
  relayAfterMs: number;
  /** How often a relayed peer is probed directly, and for how long. */
  probeEveryMs: number;
  probeWindowMs: number;
}

export const DEFAULT_PATH_TIMINGS: PathTimings = {
  trialMs: 3000,
  relayAfterMs: 6000,
  probeEveryMs: 30_000,
  probeWindowMs: 3000,
};

/** WireGuard drops a session this long after its handshake. */
const SESSION_MS = 180_000;

interface PeerPath {
  key: string;
  phase: 'direct' | 'relay';
  index: number;
  since: number;
  started: number;
  nextProbe: number;
  probe: { start: number; endpoint: string; rx: number } | null;
  /** The peer asked for a probe now. */
  asked: boolean;
}

/**
 * Per peer: direct candidates first, each for a trial period; the relay when
 * none gave a handshake; and, while relayed, a short direct probe now and
 * then. A probe succeeds when the peer answers over the direct path:
 * WireGuard's roaming then keeps the direct endpoint.
 */
export class PathSelector {
  private readonly peers = new Map<string, PeerPath>();

  constructor(
    private readonly t: PathTimings = DEFAULT_PATH_TIMINGS,
    private readonly now: () => number = Date.now,
  ) {}

  choose(peer: string, input: PathInput): PathChoice {
    const now = this.now();
    const key = input.candidates.join();
    let s = this.peers.get(peer);
    if (!s || s.key !== key) {
      s = {
        key,
        phase: 'direct',
        index: 0,
        since: now,
        started: now,
        nextProbe: 0,
        probe: null,
        asked: false,
      };
      this.peers.set(peer, s);
    }
    const onRelay = input.relayEndpoint !== undefined && input.actual === input.relayEndpoint;
    const live = input.lastHandshakeMs > 0 && now - input.lastHandshakeMs < SESSION_MS;

    if (s.probe) {
      if (now - s.probe.start < this.t.probeWindowMs) return { endpoint: s.probe.endpoint, keepalive: 1 };
      const answered = !onRelay && input.actual !== null && input.rxBytes > s.probe.rx;
      s.probe = null;
      if (answered) {
        s.phase = 'direct';
        return { endpoint: input.actual ?? undefined };
      }
      s.phase = 'relay';
      s.nextProbe = now + this.t.probeEveryMs;
      return { endpoint: RELAY };
    }
    if (live) {
      s.phase = onRelay ? 'relay' : 'direct';
      // Time towards the relay counts from the last live session, not from the first sight of the peer.
      s.started = now;
      s.since = now;
      const due = s.asked || (s.nextProbe !== 0 && now >= s.nextProbe);
      if (s.phase === 'relay' && input.candidates.length && due) {
        const endpoint = input.candidates[s.index % input.candidates.length]!;
        s.index++;
        s.probe = { start: now, endpoint, rx: input.rxBytes };
        const announce = !s.asked;
        s.asked = false;
        return { endpoint, keepalive: 1, probeStarted: { announce } };
      }
      if (s.phase === 'direct') s.asked = false;
      else if (s.nextProbe === 0) s.nextProbe = now + this.t.probeEveryMs;
      return { endpoint: onRelay ? RELAY : (input.actual ?? input.candidates[s.index]) };
    }
    if (s.phase === 'relay') {
      // A relayed peer that stays silent may be offline; start over with direct candidates.
      if (now - s.since > SESSION_MS / 6)
        Object.assign(s, { phase: 'direct', index: 0, since: now, started: now });
      else return { endpoint: RELAY };
    }
    if (input.relayAvailable && (now - s.started >= this.t.relayAfterMs || input.candidates.length === 0)) {
      Object.assign(s, { phase: 'relay', since: now, nextProbe: now + this.t.probeEveryMs });
      return { endpoint: RELAY };
    }
    if (now - s.since >= this.t.trialMs && input.candidates.length > 1) {
      s.index = (s.index + 1) % input.candidates.length;
      s.since = now;
    }
    return { endpoint: input.candidates[s.index] };
  }

  /** The peer started a probe and asks us to probe towards it at the same time. */
  probeRequested(peer: string): void {
    const s = this.peers.get(peer);
    if (s && !s.probe) s.asked = true;
  }

  probing(peer: string): boolean {
    return this.peers.get(peer)?.probe != null;
  }

  /** Drops the state of peers that left the netmap, so a returning peer starts over. */
  retain(peers: Set<string>): void {
    for (const p of this.peers.keys()) if (!peers.has(p)) this.peers.delete(p);
  }
}

/** A listen port per machine, so that several nodes behind one NAT that keeps ports do not collide. */
export function defaultListenPort(machinePublicKey: Uint8Array): number {
  return 41641 + (((machinePublicKey[0]! << 8) | machinePublicKey[1]!) % 1000);
}
