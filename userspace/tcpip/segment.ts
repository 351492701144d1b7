// TCP segments (RFC 9293 section 3.1): header fields, the options a client
// needs (MSS, window scale), and the checksum over the IP pseudo-header.
import { finish, sum } from './checksum.js';
import { buildIp, Protocol, pseudoHeaderSum } from './ip.js';

export const Flags = { FIN: 0x01, SYN: 0x02, RST: 0x04, PSH: 0x08, ACK: 0x10 } as const;

export interface Segment {
  sourcePort: number;
  destinationPort: number;
  seq: number;
  ack: number;
  flags: number;
  window: number;
  /** Options seen (received) or to send; only on SYN segments. */
  mss?: number;
  windowScale?: number;
  /** SACK-permitted (RFC 2018), on SYN segments. */
  sackPermitted?: boolean;
  /** SACK blocks [left, right) to send on an ACK. */
  sack?: [number, number][];
  payload: Uint8Array;
}

/** Null for a segment that is truncated or whose checksum fails. */
export function parseSegment(source: Uint8Array, destination: Uint8Array, b: Uint8Array): Segment | null {
  if (b.length < 20) return null;
  const offset = (b[12]! >> 4) * 4;
  if (offset < 20 || offset > b.length) return null;
  if (finish(sum(b, pseudoHeaderSum(source, destination, Protocol.TCP, b.length))) !== 0) return null;
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const seg: Segment = {
    sourcePort: v.getUint16(0),
    destinationPort: v.getUint16(2),
    seq: v.getUint32(4),
    ack: v.getUint32(8),
    flags: b[13]! & 0x3f,
    window: v.getUint16(14),
    payload: b.subarray(offset),
  };
  for (let i = 20; i < offset; ) {
    const kind = b[i]!;
    if (kind === 0) break;
    if (kind === 1) {
      i++;
      continue;
    }
    const len = b[i + 1] ?? 0;
    if (len < 2 || i + len > offset) return null;
    if (kind === 2 && len === 4) seg.mss = v.getUint16(i + 2);
    if (kind === 3 && len === 3) seg.windowScale = Math.min(b[i + 2]!, 14);
    if (kind === 4 && len === 2) seg.sackPermitted = true;
    if (kind === 5 && len > 2 && (len - 2) % 8 === 0) {
      seg.sack = [];
      for (let j = i + 2; j < i + len; j += 8) seg.sack.push([v.getUint32(j), v.getUint32(j + 4)]);
    }
    i += len;
  }
  return seg;
}

/** The segment inside an IP packet from `source` to `destination`, checksum filled in. */
export function buildSegment(source: Uint8Array, destination: Uint8Array, seg: Segment): Uint8Array {
  const options: number[] = [];
  if (seg.mss !== undefined) options.push(2, 4, seg.mss >> 8, seg.mss & 0xff);
  if (seg.windowScale !== undefined) options.push(1, 3, 3, seg.windowScale);
  if (seg.sackPermitted) options.push(1, 1, 4, 2);
  if (seg.sack?.length) {
    options.push(1, 1, 5, 2 + 8 * seg.sack.length);
    for (const edge of seg.sack.flat())
      options.push(edge >>> 24, (edge >>> 16) & 0xff, (edge >>> 8) & 0xff, edge & 0xff);
  }
  const offset = 20 + options.length;
  const b = new Uint8Array(offset + seg.payload.length);
  const v = new DataView(b.buffer);
  v.setUint16(0, seg.sourcePort);
  v.setUint16(2, seg.destinationPort);
  v.setUint32(4, seg.seq >>> 0);
  v.setUint32(8, seg.ack >>> 0);
  b[12] = (offset / 4) << 4;
  b[13] = seg.flags;
  v.setUint16(14, seg.window);
  b.set(options, 20);
  b.set(seg.payload, offset);
  v.setUint16(16, finish(sum(b, pseudoHeaderSum(source, destination, Protocol.TCP, b.length))));
  return buildIp({ source, destination, protocol: Protocol.TCP, payload: b });
}

/** Sequence-number arithmetic modulo 2^32 (RFC 9293 section 3.4). */
export const seq = {
  add: (a: number, n: number) => (a + n) >>> 0,
  diff: (a: number, b: number) => ((a - b) | 0) as number,
  lt: (a: number, b: number) => ((a - b) | 0) < 0,
  le: (a: number, b: number) => ((a - b) | 0) <= 0,
};
