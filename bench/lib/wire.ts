// What a simulated agent needs from a SyncResponse, read straight from the
// encoded message. Decoding it with protobuf-es makes one object per peer:
// 10,000 agents that each receive a full netmap of 9,999 peers are 100
// million Peer objects, minutes of CPU in the load generator, which would
// then be the limit measured instead of the coordinator. The scanner reads
// the few fields the agents look at and skips everything else.

import { createHash } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
import { deflateRawSync, inflateRawSync } from 'node:zlib';
import { create, fromBinary, type MessageInitShape, toBinary } from '@bufbuild/protobuf';
import { BinaryReader } from '@bufbuild/protobuf/wire';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import { type SyncResponse, SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import { NetMapSchema, type Peer, PeerSchema, Protocol } from '../../proto/gen/meshgate/v1/types_pb.js';
import { MAX_SHARED_PEERS_BYTES, withSharedDelta, withSharedPeers } from '../../proto/netmap.js';

const SYNC = SyncResponseSchema.field;
const NETMAP = NetMapSchema.field;
const PEER = PeerSchema.field;

export interface PeerView {
  id: string;
  /** Empty when the message has none, or when the scanner was told the id is known. */
  name: string;
  /** The first tag; empty like `name`. */
  tag: string;
}

export interface SharedPart {
  changed: PeerView[];
  removed: string[];
  patches: number;
}

export interface SyncView {
  seq: bigint;
  /** The peers of a full netmap; null in a delta. */
  full: PeerView[] | null;
  /**
   * The shared peers of a full netmap (SHARED_PEERS), the receiving node
   * among them if its group holds it; shared between views, not to be changed.
   */
  shared: readonly PeerView[];
  /** The delta's shared parts (SyncResponse.shared), before its own lists; shared between views. */
  parts: readonly SharedPart[];
  changed: PeerView[];
  removed: string[];
  patches: number;
  packetFilter: boolean;
  keepalive: boolean;
  /** Encoded size of the message. */
  bytes: number;
}

/** Where the length-delimited field at the reader's position ends. */
function endOf(r: BinaryReader): number {
  const end = r.uint32() + r.pos;
  if (end > r.len) throw new RangeError('SyncResponse: a field runs past the end of the message');
  return end;
}

function scanPeer(r: BinaryReader, known: (id: string) => boolean): PeerView {
  const p: PeerView = { id: '', name: '', tag: '' };
  const end = endOf(r);
  // Walking every field of a peer costs more than decoding the strings (each
  // skip makes a subarray), so the scan leaves the peer as soon as it has what
  // the fleet needs: the id, plus name and tag for an id the fleet has not
  // seen. protobuf-es writes fields in order, id first.
  let id = false;
  let name = false;
  let tag = false;
  while (r.pos < end) {
    const [no, wt] = r.tag();
    if (no === PEER.id.number && !id) {
      p.id = r.string();
      id = true;
      if (known(p.id)) name = tag = true;
    } else if (no === PEER.name.number && !name) {
      p.name = r.string();
      name = true;
    } else if (no === PEER.tags.number && !tag) {
      p.tag = r.string();
      tag = true;
    } else r.skip(wt, no);
    if (id && name && tag) r.pos = end;
  }
  if (r.pos !== end) throw new RangeError('SyncResponse: a peer runs past the end of its message');
  return p;
}

/**
 * The agent's view of an encoded SyncResponse. `known` says which peer ids
 * need no name and tag. Fields may come in any order (the coordinator may
 * splice pre-encoded pieces), and a netmap that comes in two parts is merged,
 * as protobuf decoders do.
 */
export function scanSync(buf: Uint8Array, known: (id: string) => boolean = () => false): SyncView {
  const r = new BinaryReader(buf);
  const v: SyncView = {
    seq: 0n,
    full: null,
    shared: [],
    parts: [],
    changed: [],
    removed: [],
    patches: 0,
    packetFilter: false,
    keepalive: false,
    bytes: buf.length,
  };
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    switch (no) {
      case SYNC.seq.number:
        v.seq = BigInt(r.uint64());
        break;
      case SYNC.full.number: {
        v.full ??= [];
        const end = endOf(r);
        while (r.pos < end) {
          const [n, w] = r.tag();
          if (n === NETMAP.peers.number) v.full.push(scanPeer(r, known));
          else if (n === NETMAP.sharedPeers.number) v.shared = sharedPeersOf(r.bytes());
          else r.skip(w, n);
        }
        if (r.pos !== end) throw new RangeError('SyncResponse: a field runs past the end of the netmap');
        break;
      }
      case SYNC.peersChanged.number:
        v.changed.push(scanPeer(r, known));
        break;
      case SYNC.shared.number:
        v.parts = [...v.parts, sharedPartOf(r.bytes())];
        break;
      case SYNC.peersRemoved.number:
        v.removed.push(r.string());
        break;
      case SYNC.peerPatches.number:
        r.skip(wt, no);
        v.patches++;
        break;
      case SYNC.packetFilter.number:
        r.skip(wt, no);
        v.packetFilter = true;
        break;
      case SYNC.keepalive.number:
        v.keepalive = r.bool();
        break;
      default:
        r.skip(wt, no);
    }
  }
  return v;
}

/**
 * Every member of a group receives the same shared peers, so the fleet
 * inflates and scans each block once (by its digest) instead of once per
 * simulated agent: 10,000 agents of one project would otherwise spend the
 * load generator's CPU on one block 10,000 times, where each real agent
 * inflates its netmap once.
 */
const sharedBlocks = new Map<string, readonly PeerView[]>();

function memo<T>(cache: Map<string, T>, block: Uint8Array, read: (r: BinaryReader) => T): T {
  const digest = createHash('sha1').update(block).digest('base64');
  let value = cache.get(digest);
  if (value === undefined) {
    value = read(new BinaryReader(inflateRawSync(block, { maxOutputLength: MAX_SHARED_PEERS_BYTES })));
    if (cache.size >= 64) cache.delete(cache.keys().next().value!);
    cache.set(digest, value);
  }
  return value;
}

function sharedPeersOf(block: Uint8Array): readonly PeerView[] {
  return memo(sharedBlocks, block, (r) => {
    const list: PeerView[] = [];
    while (r.pos < r.len) {
      const [n, w] = r.tag();
      if (n === NETMAP.peers.number) list.push(scanPeer(r, () => false));
      else r.skip(w, n);
    }
    return list;
  });
}

const sharedParts = new Map<string, SharedPart>();

function sharedPartOf(block: Uint8Array): SharedPart {
  return memo(sharedParts, block, (r) => {
    const part: SharedPart = { changed: [], removed: [], patches: 0 };
    while (r.pos < r.len) {
      const [n, w] = r.tag();
      if (n === SYNC.peersChanged.number) part.changed.push(scanPeer(r, () => false));
      else if (n === SYNC.peersRemoved.number) part.removed.push(r.string());
      else {
        if (n === SYNC.peerPatches.number) part.patches++;
        r.skip(w, n);
      }
    }
    return part;
  });
}

const peerView = (p: Peer): PeerView => ({ id: p.id, name: p.name, tag: p.tags[0] ?? '' });

/**
 * The same view of a decoded message (the `agent` signer mode receives those
 * from ControlClient). `bytes` is 0 unless `measure`, which encodes it again.
 */
export function syncViewOf(received: SyncResponse, measure: boolean, selfId?: string): SyncView {
  const msg = withSharedDelta(received, selfId);
  return {
    seq: msg.seq,
    full: msg.full ? withSharedPeers(msg.full).peers.map(peerView) : null,
    shared: [],
    parts: [],
    changed: msg.peersChanged.map(peerView),
    removed: [...msg.peersRemoved],
    patches: msg.peerPatches.length,
    packetFilter: msg.packetFilter !== undefined,
    keepalive: msg.keepalive,
    bytes: measure ? toBinary(SyncResponseSchema, received).length : 0,
  };
}

function samplePeer(i: number, tags: string[]): MessageInitShape<typeof PeerSchema> {
  return {
    id: `0123456789abcde${i}`,
    name: `agent-${i}`,
    nodeKey: 'nodekey:'.padEnd(52, 'x'),
    ipAddresses: [`100.64.0.${i}`, `fd7a:115c:a1e0::${i}`],
    allowedIps: [`100.64.0.${i}/32`, `fd7a:115c:a1e0::${i}/128`],
    endpoints: ['192.0.2.10:41641'],
    online: true,
    tags,
    lastSeen: timestampFromMs(1_700_000_000_000 + i),
    version: '0.1.0',
    relay: true,
  };
}

/**
 * Throws if the scanner reads a message differently from protobuf-es, so that
 * it cannot drift from the proto unnoticed. The messages carry every field
 * the scanner reads and, around them, fields it has to skip.
 */
export function checkScanner(): void {
  const self = { id: 'self', name: 'self', project: 'p', tags: ['tag:a'], createdAt: timestampFromMs(1) };
  const filter = {
    rules: [{ srcCidrs: ['100.64.0.0/10'], ports: [{ first: 22, last: 22 }], protocols: [Protocol.TCP] }],
  };
  const samples: MessageInitShape<typeof SyncResponseSchema>[] = [
    {
      seq: 2n ** 40n + 7n,
      full: {
        self,
        peers: [samplePeer(1, ['tag:b', 'tag:c']), samplePeer(2, [])],
        packetFilter: filter,
        dns: [{ name: 'agent-1', ipAddresses: ['100.64.0.1'] }],
        desiredVersion: '0.2.0',
        domain: 'mesh.internal',
        keepaliveSeconds: 25,
        relay: { enabled: true },
      },
      peersChanged: [samplePeer(3, ['tag:a'])],
      peersRemoved: ['0123456789abcde4', '0123456789abcde5'],
      peerPatches: [
        { id: '0123456789abcde1', online: false },
        { id: '0123456789abcde2', endpointsChanged: true },
      ],
      packetFilter: filter,
      desiredVersion: '0.2.0',
      self,
      dns: [{ name: 'agent-3', ipAddresses: ['100.64.0.3'] }],
      dnsChanged: true,
      keepalive: true,
    },
    // The first message in a project of one node: a full netmap without peers.
    { seq: 1n, full: {} },
    // Shared peers holding the node itself and a peer that changed since.
    {
      seq: 1n,
      full: {
        self,
        peers: [samplePeer(2, ['tag:d'])],
        sharedPeers: deflateRawSync(
          toBinary(
            NetMapSchema,
            create(NetMapSchema, {
              peers: [samplePeer(1, ['tag:b']), samplePeer(2, []), { id: 'self', name: 'self' }],
            }),
          ),
        ),
      },
    },
    { seq: 3n, keepalive: true },
    // A delta with shared parts, one naming the node itself.
    {
      seq: 4n,
      peersChanged: [samplePeer(6, ['tag:a'])],
      peersRemoved: ['0123456789abcde7'],
      shared: [
        deflateRawSync(
          toBinary(
            SyncResponseSchema,
            create(SyncResponseSchema, {
              peersChanged: [samplePeer(8, []), { id: 'self', name: 'self' }],
              peersRemoved: ['0123456789abcde9'],
              peerPatches: [{ id: '0123456789abcde1', online: true }],
            }),
          ),
        ),
        deflateRawSync(
          toBinary(
            SyncResponseSchema,
            create(SyncResponseSchema, { peerPatches: [{ id: '0123456789abcde2', online: false }] }),
          ),
        ),
      ],
    },
  ];
  for (const init of samples) {
    const bytes = toBinary(SyncResponseSchema, create(SyncResponseSchema, init));
    const want = syncViewOf(fromBinary(SyncResponseSchema, bytes), true, self.id);
    const anon = (p: PeerView) => ({ id: p.id, name: '', tag: '' });
    // As a simulated agent applies it: the shared peers without itself, then
    // the netmap's own, which replace shared ones of the same id.
    const merged = (v: SyncView): SyncView => {
      const parts = v.parts;
      const delta = {
        ...v,
        changed: [...parts.flatMap((p) => p.changed.filter((c) => c.id !== self.id)), ...v.changed],
        removed: [...parts.flatMap((p) => p.removed), ...v.removed],
        patches: parts.reduce((n, p) => n + p.patches, v.patches),
        parts: [],
      };
      if (!v.shared.length || !v.full) return delta;
      const own = new Set(v.full.map((p) => p.id));
      const full = [...v.shared.filter((p) => p.id !== self.id && !own.has(p.id)), ...v.full];
      return { ...delta, full: full.sort((a, b) => a.id.localeCompare(b.id)), shared: [] };
    };
    const sorted = (v: SyncView): SyncView =>
      v.full ? { ...v, full: [...v.full].sort((a, b) => a.id.localeCompare(b.id)) } : v;
    const cases: [SyncView, SyncView][] = [
      [merged(scanSync(bytes)), sorted(want)],
      [
        // The shared peers come with names whether known or not: one scan serves every agent.
        ((v) => ({ ...v, full: v.full ? v.full.map(anon) : null, changed: v.changed.map(anon) }))(
          merged(scanSync(bytes, () => true)),
        ),
        sorted({ ...want, full: want.full ? want.full.map(anon) : null, changed: want.changed.map(anon) }),
      ],
    ];
    for (const [got, expected] of cases)
      if (!isDeepStrictEqual(got, expected))
        throw new Error(
          `bench/lib/wire.ts reads a SyncResponse differently from protobuf-es: ${JSON.stringify(
            { got, expected },
            (_, x) => (typeof x === 'bigint' ? `${x}` : x),
          )}`,
        );
  }
}
