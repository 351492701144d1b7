// The bytes of the messages the mapper sends, put together from pieces that
// are encoded once. In a project every agent receives the same peers: encoding
// each Peer again for every recipient was most of the coordinator's CPU in
// policy changes and reconnect storms. A repeated field on the wire is just
// its elements one after another, and fields may come in any order, so a
// message is the encoding of its singular fields followed by the cached
// encodings of its repeated elements.
import { create, type MessageInitShape, toBinary } from '@bufbuild/protobuf';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import { SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import { NetMapSchema } from '../../proto/gen/meshgate/v1/types_pb.js';

const SYNC = SyncResponseSchema.field;
const NETMAP = NetMapSchema.field;

/** Appends one length-delimited element of a repeated field per chunk. */
function repeated(w: BinaryWriter, fieldNo: number, chunks: Iterable<Uint8Array>): void {
  for (const c of chunks) w.tag(fieldNo, WireType.LengthDelimited).bytes(c);
}

export interface NetMapPieces {
  /** The singular fields (self, packet filter, versions, domain, relay) and self's DNS record. */
  head: MessageInitShape<typeof NetMapSchema>;
  peers: Iterable<Uint8Array>;
  dns: Iterable<Uint8Array>;
}

/** A SyncResponse carrying a full netmap, without its sequence number. */
export function fullBody(map: NetMapPieces): Uint8Array {
  const w = new BinaryWriter();
  w.raw(toBinary(NetMapSchema, create(NetMapSchema, map.head)));
  repeated(w, NETMAP.peers.number, map.peers);
  repeated(w, NETMAP.dns.number, map.dns);
  const netmap = w.finish();
  return new BinaryWriter().tag(SYNC.full.number, WireType.LengthDelimited).bytes(netmap).finish();
}

export interface DeltaPieces {
  /** The singular fields: packet filter, desired version, self. */
  head: MessageInitShape<typeof SyncResponseSchema>;
  changed: Iterable<Uint8Array>;
  removed: Iterable<string>;
  patches: Iterable<Uint8Array>;
}

/** A SyncResponse carrying changes, without its sequence number. */
export function deltaBody(d: DeltaPieces): Uint8Array {
  const w = new BinaryWriter();
  w.raw(toBinary(SyncResponseSchema, create(SyncResponseSchema, d.head)));
  repeated(w, SYNC.peersChanged.number, d.changed);
  for (const id of d.removed) w.tag(SYNC.peersRemoved.number, WireType.LengthDelimited).string(id);
  repeated(w, SYNC.peerPatches.number, d.patches);
  return w.finish();
}

export const KEEPALIVE_BODY = toBinary(SyncResponseSchema, create(SyncResponseSchema, { keepalive: true }));

/** The message as sent on one stream: its sequence number, then the shared body. */
export function framed(seq: bigint, body: Uint8Array): Uint8Array {
  const head = new BinaryWriter().tag(SYNC.seq.number, WireType.Varint).uint64(seq).finish();
  return Buffer.concat([head, body]);
}
