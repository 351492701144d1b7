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

/** Same-subnet candidates first, then the others in the coordinator's order; IPv4 before IPv6. */
export function orderCandidates(endpoints: string[], locals: LocalAddress[]): string[] {
  const v4 = endpoints.filter((e) => !e.startsWith('['));
  const v6 = endpoints.filter((e) => e.startsWith('['));
  return [...v4.filter((e) => sameSubnet(e, locals)), ...v4.filter((e) => !sameSubnet(e, locals)), ...v6];
}

/**
 * Per peer: the candidate in use, and when it was chosen. Without a
 * handshake after `trialMs`, the next candidate is tried; once a handshake
 * completed the choice sticks and WireGuard's roaming takes over.
 */
export class PathSelector {
  private readonly state = new Map<
    string,
    { candidates: string[]; index: number; since: number; established: boolean }
  >();

  constructor(
    private readonly trialMs = 5000,
    private readonly now: () => number = Date.now,
  ) {}

  /** The endpoint to configure for `peer`, and whether it must replace the one WireGuard has. */
  choose(
    peer: string,
    candidates: string[],
    lastHandshakeMs: number,
  ): { endpoint: string | undefined; force: boolean } {
    const now = this.now();
    let s = this.state.get(peer);
    if (!s || s.candidates.join() !== candidates.join()) {
      s = { candidates, index: 0, since: now, established: false };
      this.state.set(peer, s);
      return { endpoint: candidates[0], force: true };
    }
    if (lastHandshakeMs > 0 && now - lastHandshakeMs < 180_000) {
      s.established = true;
      return { endpoint: candidates[s.index], force: false };
    }
    if (now - s.since >= this.trialMs && candidates.length > 1) {
      s.index = (s.index + 1) % candidates.length;
      s.since = now;
      s.established = false;
      return { endpoint: candidates[s.index], force: true };
    }
    return { endpoint: candidates[s.index], force: false };
  }

  forget(peer: string): void {
    this.state.delete(peer);
  }

  current(peer: string): string | undefined {
    const s = this.state.get(peer);
    return s ? s.candidates[s.index] : undefined;
  }
}

/** A listen port per machine, so that several nodes behind one NAT that keeps ports do not collide. */
export function defaultListenPort(machinePublicKey: Uint8Array): number {
  return 41641 + (((machinePublicKey[0]! << 8) | machinePublicKey[1]!) % 1000);
}
