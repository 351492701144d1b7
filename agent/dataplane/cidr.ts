// One canonical text form per prefix, so configuration from the coordinator and what `wg` and `ip`
// print can be compared as plain strings, and so nothing but an address reaches a command or a
// firewall script.
import { isIPv4, isIPv6 } from 'node:net';

export class InvalidCidrError extends Error {
  constructor(readonly input: string) {
    super(
      `not an IP prefix: ${JSON.stringify(input.slice(0, 80))} (expected e.g. 100.64.0.1/32 or fd7a::/48)`,
    );
    this.name = 'InvalidCidrError';
  }
}

export interface Cidr {
  family: 4 | 6;
  bytes: Uint8Array;
  prefix: number;
}

export function parseIp(text: string): { family: 4 | 6; bytes: Uint8Array } | null {
  if (isIPv4(text)) return { family: 4, bytes: parseV4(text) };
  if (isIPv6(text) && !text.includes('%')) return { family: 6, bytes: parseV6(text) };
  return null;
}

/** Accepts `ADDR/LEN` or a bare address (a host prefix); host bits are cleared as WireGuard does. */
export function parseCidr(text: string): Cidr {
  const slash = text.indexOf('/');
  const ip = parseIp(slash < 0 ? text : text.slice(0, slash));
  if (!ip) throw new InvalidCidrError(text);
  const max = ip.family === 4 ? 32 : 128;
  let prefix = max;
  if (slash >= 0) {
    const len = text.slice(slash + 1);
    if (!/^\d{1,3}$/.test(len) || Number(len) > max) throw new InvalidCidrError(text);
    prefix = Number(len);
  }
  return { family: ip.family, bytes: mask(ip.bytes, prefix), prefix };
}

function formatCidr(c: Cidr): string {
  return `${formatIp(c.family, c.bytes)}/${c.prefix}`;
}

export function normalizeCidr(text: string): string {
  return formatCidr(parseCidr(text));
}

export function formatIp(family: 4 | 6, bytes: Uint8Array): string {
  return family === 4 ? Array.from(bytes).join('.') : formatV6(bytes);
}

function parseV4(text: string): Uint8Array {
  return Uint8Array.from(text.split('.').map(Number));
}

function parseV6(text: string): Uint8Array {
  // An embedded dotted quad stands for the last two groups; rewrite it as such.
  const tail = text.lastIndexOf(':');
  const quad = text.slice(tail + 1);
  let s = text;
  if (quad.includes('.')) {
    const v4 = parseV4(quad);
    const group = (hi: number, lo: number) => ((hi << 8) | lo).toString(16);
    s = `${text.slice(0, tail + 1)}${group(v4[0]!, v4[1]!)}:${group(v4[2]!, v4[3]!)}`;
  }
  const groups = (part: string) => (part ? part.split(':').map((g) => Number.parseInt(g, 16)) : []);
  const [head = '', rest] = s.split('::');
  const left = groups(head);
  const right = rest === undefined ? [] : groups(rest);
  const all = [...left, ...new Array<number>(8 - left.length - right.length).fill(0), ...right];
  const bytes = new Uint8Array(16);
  all.forEach((g, i) => {
    bytes[i * 2] = g >> 8;
    bytes[i * 2 + 1] = g & 0xff;
  });
  return bytes;
}

/** RFC 5952: lower case, no leading zeros, the longest run of two or more zero groups as `::`. */
function formatV6(bytes: Uint8Array): string {
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push((bytes[i]! << 8) | bytes[i + 1]!);
  let bestStart = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (gs: number[]) => gs.map((g) => g.toString(16)).join(':');
  if (bestStart < 0) return hex(groups);
  return `${hex(groups.slice(0, bestStart))}::${hex(groups.slice(bestStart + bestLen))}`;
}

function mask(bytes: Uint8Array, prefix: number): Uint8Array {
  const out = Uint8Array.from(bytes);
  for (let i = 0; i < out.length; i++) {
    const keep = Math.max(0, Math.min(8, prefix - i * 8));
    out[i] = out[i]! & ((0xff << (8 - keep)) & 0xff);
  }
  return out;
}

/** An address assigned to an interface: like a prefix, but the host bits are the point. */
export function normalizeInterfaceAddress(text: string): string {
  const { family, prefix } = parseCidr(text);
  const ip = parseIp(text.split('/')[0]!)!;
  return `${formatIp(family, ip.bytes)}/${prefix}`;
}

export function cidrFamily(text: string): 4 | 6 {
  return text.includes(':') ? 6 : 4;
}
