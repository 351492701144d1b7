// The bytes of the messages the mapper sends, put together from pieces that
// are encoded once. In a project every agent receives the same peers (and
// often the same packet-filter sources): encoding them again for every
// recipient was most of the coordinator's CPU in policy changes and reconnect
// storms. A repeated field on the wire is just its elements one after
// another, and fields may come in any order, so a message is the encoding of
// its singular fields followed by the cached encodings of its repeated
// elements. Each message is written into one buffer of its exact size: a full
// netmap of 10,000 peers is 2.7 MB, and growing a buffer for it and copying
// it between stages cost more than encoding it.
import { constants, deflateRawSync } from 'node:zlib';
import { create, toBinary } from '@bufbuild/protobuf';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import { SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';

/** Part of a message on the wire. */
export type Piece =
  /** Fields already encoded. */
  | Uint8Array
  /** One length-delimited field `field` per element: repeated messages, strings or bytes. */
  | { readonly field: number; readonly elements: readonly Uint8Array[] }
  /** A submessage in field `field`, itself put together from pieces. */
  | { readonly field: number; readonly message: readonly Piece[] };

function varintSize(n: number): number {
  let size = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    size++;
  }
  return size;
}

function writeVarint(buf: Uint8Array, pos: number, n: number): number {
  while (n >= 0x80) {
    buf[pos++] = (n & 0x7f) | 0x80;
    n = Math.floor(n / 0x80);
  }
  buf[pos++] = n;
  return pos;
}

const delimited = (field: number) => field * 8 + WireType.LengthDelimited;

/** The encoded size of a message made of `pieces`. */
export function sizeOf(pieces: readonly Piece[]): number {
  let total = 0;
  for (const p of pieces) {
    if (p instanceof Uint8Array) {
      total += p.length;
    } else if ('elements' in p) {
      const tag = varintSize(delimited(p.field));
      for (const e of p.elements) total += tag + varintSize(e.length) + e.length;
    } else {
      const inner = sizeOf(p.message);
      total += varintSize(delimited(p.field)) + varintSize(inner) + inner;
    }
  }
  return total;
}

function writePieces(buf: Uint8Array, pos: number, pieces: readonly Piece[]): number {
  for (const p of pieces) {
    if (p instanceof Uint8Array) {
      buf.set(p, pos);
      pos += p.length;
    } else if ('elements' in p) {
      const tag = delimited(p.field);
      for (const e of p.elements) {
        pos = writeVarint(buf, pos, tag);
        pos = writeVarint(buf, pos, e.length);
        // set() costs more than a loop for the short elements (ids, patches) that deltas are made of.
        if (e.length < 64) for (let k = 0; k < e.length; k++) buf[pos + k] = e[k]!;
        else buf.set(e, pos);
        pos += e.length;
      }
    } else {
      pos = writeVarint(buf, pos, delimited(p.field));
      pos = writeVarint(buf, pos, sizeOf(p.message));
      pos = writePieces(buf, pos, p.message);
    }
  }
  return pos;
}

/** One message from its pieces, in a buffer of exactly its size. */
export function assemble(pieces: readonly Piece[]): Uint8Array {
  const buf = Buffer.allocUnsafe(sizeOf(pieces));
  writePieces(buf, 0, pieces);
  return buf;
}

/** The sequence number of a SyncResponse, which differs per stream. */
export function seqField(seq: bigint): Uint8Array {
  return new BinaryWriter().tag(SyncResponseSchema.field.seq.number, WireType.Varint).uint64(seq).finish();
}

export const KEEPALIVE = toBinary(SyncResponseSchema, create(SyncResponseSchema, { keepalive: true }));

/** Bytes as the shared parts of messages are compressed (raw DEFLATE). */
export function deflate(raw: Uint8Array): Uint8Array {
  return deflateRawSync(raw, { level: constants.Z_DEFAULT_COMPRESSION });
}

/** A message made of `pieces`, compressed. */
export function compressed(pieces: readonly Piece[]): Uint8Array {
  return deflate(assemble(pieces));
}
