// Where the bytes of a full netmap go, and what compressing it would cost: the
// coordinator's real mapper builds the full netmap of one node in a project of
// N nodes (in-memory SQLite, nothing on the network). JSON on stdout.
//
//   node --import tsx bench/netmap-bytes.ts [--nodes 1000]

import { parseArgs } from 'node:util';
import { deflateSync } from 'node:zlib';
import { create, fromBinary, type MessageInitShape, toBinary } from '@bufbuild/protobuf';
import { Mapper } from '../coordinator/mapper/mapper.js';
import { State } from '../coordinator/state/state.js';
import { openStore } from '../coordinator/store/db.js';
import { SyncResponseSchema } from '../proto/gen/meshgate/v1/control_pb.js';
import { NetMapSchema, type Peer, PeerSchema } from '../proto/gen/meshgate/v1/types_pb.js';
import { encodeWgKey, generateMachineKey, generateNodeKey } from '../proto/keys.js';
import { ENDPOINTS } from './lib/agents.js';
import { round } from './lib/stats.js';

const { values } = parseArgs({ options: { nodes: { type: 'string', default: '1000' } } });
const n = Number(values.nodes);
const store = await openStore({ url: ':memory:' });
const state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
await state.createProject('bench', 'mesh');
const { key } = await state.keys.createAuthKey('bench', {
  project: 'mesh',
  reusable: true,
  ephemeral: false,
  expiresInMs: 3_600_000,
  tags: ['tag:a', 'tag:b'],
  reason: '',
});
let first = '';
// The nodes of bench/coordinator.ts: half tag:a, half tag:b, one endpoint each.
for (let i = 0; i < n; i++) {
  const { node } = await state.register({
    authKey: key,
    machineKey: Buffer.from(generateMachineKey().publicKey).toString('hex'),
    nodeKey: encodeWgKey(generateNodeKey().publicKey),
    hostname: `agent-${i}`,
    os: 'linux',
    version: '0.1.0',
    requestedTags: [i % 2 ? 'tag:b' : 'tag:a'],
    endpoints: ENDPOINTS,
    advertisedRoutes: [],
  });
  first ||= node.id;
}
const mapper = new Mapper(state, {
  coalesceMs: 20,
  presenceMs: 1000,
  sliceMs: 20,
  fullNetmapBudget: 2 ** 30,
  keepaliveMs: 60_000,
  keepaliveSeconds: 25,
  relay: false,
  domainSuffix: 'mesh',
});
mapper.flush();
let encoded: Uint8Array | undefined;
mapper.attach({
  nodeId: first,
  send: (m: Uint8Array, sent?: () => void) => {
    encoded ??= m;
    sent?.();
  },
  close() {},
});
const full = fromBinary(SyncResponseSchema, encoded!).full!;
const peers = full.peers;
/** Encoded bytes per peer of the given fields alone. */
const perPeer = (pick: (p: Peer) => MessageInitShape<typeof PeerSchema>) =>
  round(
    peers.reduce((s, p) => s + toBinary(PeerSchema, create(PeerSchema, pick(p))).length, 0) / peers.length,
  );
const bytesOf = (field: keyof typeof full) =>
  toBinary(NetMapSchema, create(NetMapSchema, { [field]: full[field] })).length;
const compression = [1, 6].map((level) => {
  let out = 0;
  const t0 = performance.now();
  for (let i = 0; i < 10; i++) out = deflateSync(encoded!, { level }).length;
  const ms = (performance.now() - t0) / 10;
  return { level, bytes: out, ratio: round(out / encoded!.length, 3), ms: round(ms, 2) };
});
process.stdout.write(
  `${JSON.stringify({
    benchmark: 'netmap-bytes',
    nodes: n,
    fullNetmapBytes: encoded!.length,
    peers: { count: peers.length, bytes: bytesOf('peers') },
    dnsBytes: bytesOf('dns'),
    packetFilterBytes: bytesOf('packetFilter'),
    perPeerBytes: {
      all: perPeer((p) => p as MessageInitShape<typeof PeerSchema>),
      id: perPeer((p) => ({ id: p.id })),
      name: perPeer((p) => ({ name: p.name })),
      nodeKey: perPeer((p) => ({ nodeKey: p.nodeKey })),
      ipAddresses: perPeer((p) => ({ ipAddresses: p.ipAddresses })),
      allowedIps: perPeer((p) => ({ allowedIps: p.allowedIps })),
      endpoints: perPeer((p) => ({ endpoints: p.endpoints })),
      tags: perPeer((p) => ({ tags: p.tags })),
      lastSeen: perPeer((p) => ({ lastSeen: p.lastSeen })),
      version: perPeer((p) => ({ version: p.version })),
    },
    deflate: compression,
  })}\n`,
);
mapper.close();
await store.close();
