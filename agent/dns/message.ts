// The little of the DNS wire format (RFC 1035) the mesh's names need: one question in, A or AAAA
// answers out. Everything from the network is checked before use; what does not parse is dropped.
import { isIPv4, isIPv6 } from 'node:net';

export const TYPE_A = 1;
export const TYPE_AAAA = 28;
const CLASS_IN = 1;
const HEADER = 12;
const MAX_NAME = 255;

export const RCODE = { ok: 0, formErr: 1, nxDomain: 3, notImp: 4, refused: 5 } as const;

export interface Question {
  id: number;
  /** Recursion desired, echoed in the answer. */
  rd: boolean;
  /** Lower case, without the trailing dot. */
  name: string;
  type: number;
  qclass: number;
  /** The question section as received, echoed in the answer. */
  raw: Uint8Array;
}

/** The first question of a query, or null for anything that is not a plain standard query. */
export function parseQuery(msg: Uint8Array): Question | null {
  if (msg.length < HEADER + 5 || msg.length > 512) return null;
  const view = new DataView(msg.buffer, msg.byteOffset, msg.byteLength);
  const flags = view.getUint16(2);
  const qr = flags >> 15;
  const opcode = (flags >> 11) & 0xf;
  if (qr !== 0 || opcode !== 0 || view.getUint16(4) !== 1) return null;
  const labels: string[] = [];
  let at = HEADER;
  for (;;) {
    const len = msg[at];
    if (len === undefined || len > 63) return null; // also rejects compression pointers
    at++;
    if (len === 0) break;
    if (at + len > msg.length) return null;
    labels.push(Buffer.from(msg.subarray(at, at + len)).toString('latin1'));
    at += len;
    if (at - HEADER > MAX_NAME) return null;
  }
  if (at + 4 > msg.length) return null;
  return {
    id: view.getUint16(0),
    rd: ((flags >> 8) & 1) === 1,
    name: labels.join('.').toLowerCase(),
    type: view.getUint16(at),
    qclass: view.getUint16(at + 2),
    raw: msg.subarray(HEADER, at + 4),
  };
}

/** An answer to `q` with `rcode` and the addresses that fit the question's type. */
export function buildAnswer(q: Question, rcode: number, addresses: string[], ttl = 60): Uint8Array {
  const answers = addresses
    .map((a) => (q.type === TYPE_A && isIPv4(a) ? v4(a) : q.type === TYPE_AAAA && isIPv6(a) ? v6(a) : null))
    .filter((r): r is Uint8Array => r !== null);
  const size = HEADER + q.raw.length + answers.reduce((n, r) => n + 12 + r.length, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  view.setUint16(0, q.id);
  // QR, authoritative; RD echoed; no recursion available.
  view.setUint16(2, 0x8000 | 0x0400 | (q.rd ? 0x0100 : 0) | (rcode & 0xf));
  view.setUint16(4, 1);
  view.setUint16(6, answers.length);
  out.set(q.raw, HEADER);
  let at = HEADER + q.raw.length;
  for (const rdata of answers) {
    view.setUint16(at, 0xc000 | HEADER); // the name: a pointer to the question's
    view.setUint16(at + 2, q.type);
    view.setUint16(at + 4, CLASS_IN);
    view.setUint32(at + 6, ttl);
    view.setUint16(at + 10, rdata.length);
    out.set(rdata, at + 12);
    at += 12 + rdata.length;
  }
  return out;
}

export function isClassIn(q: Question): boolean {
  return q.qclass === CLASS_IN;
}

function v4(a: string): Uint8Array {
  return Uint8Array.from(a.split('.').map(Number));
}

function v6(a: string): Uint8Array {
  const [head, tail] = a.includes('::') ? a.split('::') : [a, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  const out = new Uint8Array(16);
  groups.forEach((g, i) => {
    const n = Number.parseInt(g, 16);
    out[2 * i] = n >> 8;
    out[2 * i + 1] = n & 0xff;
  });
  return out;
}
