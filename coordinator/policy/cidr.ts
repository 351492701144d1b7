import { isIPv4, isIPv6 } from 'node:net';

export type Family = 4 | 6;

/** Bytes in network order: 4 for IPv4, 16 for IPv6. */
export interface Address {
  family: Family;
  bytes: Uint8Array;
}

/** An IP network; its bytes may carry host bits until `masked` clears them. */
export interface Prefix extends Address {
  length: number;
}

const WIDTH: Record<Family, number> = { 4: 32, 6: 128 };

export function parseAddress(text: string): Address | undefined {
  if (isIPv4(text)) return { family: 4, bytes: Uint8Array.from(text.split('.'), Number) };
  // Zone ids (fe80::1%eth0) name a local interface and mean nothing in a mesh policy.
  if (isIPv6(text) && !text.includes('%')) return { family: 6, bytes: parseV6(text) };
  return undefined;
}

/** Parses `addr` or `addr/len`; a bare address is a single-host prefix. */
export function parsePrefix(text: string): Prefix | undefined {
  const slash = text.indexOf('/');
  const address = parseAddress(slash < 0 ? text : text.slice(0, slash));
  if (!address) return undefined;
  if (slash < 0) return hostPrefix(address);
  const length = text.slice(slash + 1);
  if (!/^(0|[1-9][0-9]{0,2})$/.test(length) || Number(length) > WIDTH[address.family]) return undefined;
  return { ...address, length: Number(length) };
}

export function hostPrefix(address: Address): Prefix {
  return { ...address, length: WIDTH[address.family] };
}

export function isHostPrefix(prefix: Prefix): boolean {
  return prefix.length === WIDTH[prefix.family];
}

export function masked(prefix: Prefix): Prefix {
  const bytes = prefix.bytes.map((byte, i) => byte & byteMask(prefix.length, i));
  return { ...prefix, bytes };
}

export function hasHostBits(prefix: Prefix): boolean {
  return prefix.bytes.some((byte, i) => (byte & ~byteMask(prefix.length, i)) !== 0);
}

export function contains(prefix: Prefix, address: Address): boolean {
  if (prefix.family !== address.family) return false;
  const whole = prefix.length >> 3;
  for (let i = 0; i < whole; i++) if (prefix.bytes[i] !== address.bytes[i]) return false;
  if (whole === prefix.bytes.length) return true;
  const mask = byteMask(prefix.length, whole);
  return (prefix.bytes[whole]! & mask) === (address.bytes[whole]! & mask);
}

/** Two prefixes overlap only when one contains the other; the overlap is then the longer one. */
export function intersection(a: Prefix, b: Prefix): Prefix | undefined {
  const [wide, narrow] = a.length <= b.length ? [a, b] : [b, a];
  return contains(wide, narrow) ? narrow : undefined;
}

export function formatPrefix(prefix: Prefix): string {
  return `${formatAddress(prefix)}/${prefix.length}`;
}

/** Canonical text: dotted quad, or RFC 5952 for IPv6. */
export function formatAddress(address: Address): string {
  const { bytes } = address;
  if (address.family === 4) return bytes.join('.');
  const groups = Array.from({ length: 8 }, (_, i) => (bytes[2 * i]! << 8) | bytes[2 * i + 1]!);
  // RFC 5952: compress the longest run of two or more zero groups, the first one on a tie.
  let best = { start: -1, length: 1 };
  for (let i = 0; i < groups.length; ) {
    let j = i;
    while (j < groups.length && groups[j] === 0) j++;
    if (j - i > best.length) best = { start: i, length: j - i };
    i = j === i ? i + 1 : j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (best.start < 0) return hex.join(':');
  return `${hex.slice(0, best.start).join(':')}::${hex.slice(best.start + best.length).join(':')}`;
}

/** The mask of byte `index` of a prefix `length` bits long. */
function byteMask(length: number, index: number): number {
  const bits = Math.min(Math.max(length - index * 8, 0), 8);
  return (0xff << (8 - bits)) & 0xff;
}

function parseV6(text: string): Uint8Array {
  const groups = (part: string): number[] =>
    part === ''
      ? []
      : part.split(':').flatMap((g) => {
          if (!g.includes('.')) return [Number.parseInt(g, 16)];
          const [a = 0, b = 0, c = 0, d = 0] = g.split('.').map(Number);
          return [(a << 8) | b, (c << 8) | d];
        });
  const [head = '', tail] = text.split('::');
  const before = groups(head);
  const after = tail === undefined ? [] : groups(tail);
  const zeros = new Array<number>(8 - before.length - after.length).fill(0);
  const bytes = new Uint8Array(16);
  [...before, ...zeros, ...after].forEach((group, i) => {
    bytes[2 * i] = group >> 8;
    bytes[2 * i + 1] = group & 0xff;
  });
  return bytes;
}
