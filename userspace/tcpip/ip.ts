// IPv4 and IPv6 headers: parse what arrives through the tunnel, build what
// leaves it. No options are sent; received IPv4 options are skipped, IPv6
// extension headers are not followed (the mesh's own traffic has none).
import { checksum, sum } from './checksum.js';

export const Protocol = { ICMP: 1, TCP: 6, UDP: 17, ICMPv6: 58 } as const;

export interface IpPacket {
  version: 4 | 6;
  source: Uint8Array;
  destination: Uint8Array;
  protocol: number;
  ttl: number;
  payload: Uint8Array;
}

/** Null for anything that is not a whole, well-formed, unfragmented IPv4 or IPv6 packet. */
export function parseIp(p: Uint8Array): IpPacket | null {
  const version = p.length ? p[0]! >> 4 : 0;
  if (version === 4) {
    const ihl = (p[0]! & 0x0f) * 4;
    if (p.length < 20 || ihl < 20) return null;
    const total = (p[2]! << 8) | p[3]!;
    if (total < ihl || total > p.length) return null;
    if (checksum(p.subarray(0, ihl)) !== 0) return null;
    const flagsFragment = (p[6]! << 8) | p[7]!;
    if (flagsFragment & 0x3fff) return null;
    return {
      version: 4,
      ttl: p[8]!,
      protocol: p[9]!,
      source: p.subarray(12, 16),
      destination: p.subarray(16, 20),
      payload: p.subarray(ihl, total),
    };
  }
  if (version === 6) {
    if (p.length < 40) return null;
    const length = (p[4]! << 8) | p[5]!;
    if (40 + length > p.length) return null;
    return {
      version: 6,
      protocol: p[6]!,
      ttl: p[7]!,
      source: p.subarray(8, 24),
      destination: p.subarray(24, 40),
      payload: p.subarray(40, 40 + length),
    };
  }
  return null;
}

let nextId = 1;

export function buildIp(o: Omit<IpPacket, 'version' | 'ttl'> & { ttl?: number }): Uint8Array {
  const ttl = o.ttl ?? 64;
  if (o.source.length === 4) {
    const p = new Uint8Array(20 + o.payload.length);
    p[0] = 0x45;
    p[2] = p.length >> 8;
    p[3] = p.length & 0xff;
    const id = nextId++ & 0xffff;
    p[4] = id >> 8;
    p[5] = id & 0xff;
    p[6] = 0x40;
    p[8] = ttl;
    p[9] = o.protocol;
    p.set(o.source, 12);
    p.set(o.destination, 16);
    const c = checksum(p.subarray(0, 20));
    p[10] = c >> 8;
    p[11] = c & 0xff;
    p.set(o.payload, 20);
    return p;
  }
  const p = new Uint8Array(40 + o.payload.length);
  p[0] = 0x60;
  p[4] = o.payload.length >> 8;
  p[5] = o.payload.length & 0xff;
  p[6] = o.protocol;
  p[7] = ttl;
  p.set(o.source, 8);
  p.set(o.destination, 24);
  p.set(o.payload, 40);
  return p;
}

/** The pseudo-header sum that TCP, UDP and ICMPv6 checksums start from. */
export function pseudoHeaderSum(
  source: Uint8Array,
  destination: Uint8Array,
  protocol: number,
  length: number,
): number {
  const s = sum(destination, sum(source));
  return s + protocol + length;
}

export function parseAddress(text: string): Uint8Array | null {
  const v4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(text);
  if (v4) {
    const b = v4.slice(1).map(Number);
    return b.every((x) => x <= 255) ? new Uint8Array(b) : null;
  }
  if (!text.includes(':')) return null;
  const [head, tail, extra] = text.split('::');
  if (extra !== undefined) return null;
  const words = (s: string | undefined) => (s ? s.split(':') : []);
  const h = words(head);
  const t = words(tail);
  const fill = tail === undefined ? 0 : 8 - h.length - t.length;
  const all = [...h, ...Array(fill).fill('0'), ...t];
  if (all.length !== 8 || fill < 0 || !all.every((w) => /^[0-9a-fA-F]{1,4}$/.test(w))) return null;
  const out = new Uint8Array(16);
  all.forEach((w, i) => {
    const v = Number.parseInt(w, 16);
    out[2 * i] = v >> 8;
    out[2 * i + 1] = v & 0xff;
  });
  return out;
}

export function formatAddress(a: Uint8Array): string {
  if (a.length === 4) return a.join('.');
  const words: string[] = [];
  for (let i = 0; i < 16; i += 2) words.push(((a[i]! << 8) | a[i + 1]!).toString(16));
  return words.join(':').replace(/(^|:)0(:0)+(:|$)/, '::');
}
