// Where the bytes of a full netmap go, and what compressing it would cost: the
// coordinator's real mapper builds the full netmap of one node in a project of
// N nodes (in-memory SQLite, nothing on the network). Then, for each form of
// the netmap (the full form old agents get, the one without implied peer
// fields, the one with the project's peers compressed once and shared), it
// attaches K sessions and measures bytes and CPU per full netmap,
// and of the fan-out of two policy changes (tag:a may reach tag:b, then no
// policy again) to those K sessions; `projected` scales them to N sessions.
// JSON on stdout.
//
//   node --import tsx bench/netmap-bytes.ts [--nodes 1000] [--sessions 1000]

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

const { values } = parseArgs({
  options: { nodes: { type: 'string', default: '1000' }, sessions: { type: 'string' } },
});
const n = Number(values.nodes);
const k = Math.min(n, Number(values.sessions ?? 1000));
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
const ids: string[] = [];
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
  ids.push(node.id);
}
const mapper = new Mapper(state, {
  coalesceMs: 20,
  presenceMs: 1000,
  // Every flush in one go, so that it can be timed.
  sliceMs: 2 ** 30,
  fullNetmapBudget: 2 ** 30,
  deltaBudget: 2 ** 30,
  stallMs: 600_000,
  keepaliveMs: 60_000,
  keepaliveSeconds: 25,
  relay: false,
  domainSuffix: 'mesh',
});
mapper.flush();
/** A SyncResponse as the mapper writes it: its seq, then `full` (field 2) when it has one. */
function isFull(m: Uint8Array): boolean {
  let i = 1;
  while (m[i]! & 0x80) i++;
  return m[i + 1] === (SyncResponseSchema.field.full.number << 3) + 2;
}

/** Attaches a session that counts what it receives; `first` is its full netmap when `keep`. */
function attach(id: string, implied: boolean, keep = false, shared = false) {
  const rec = { first: undefined as Uint8Array | undefined, bytes: 0, messages: 0, fulls: 0 };
  mapper.attach({
    nodeId: id,
    impliedPeerFields: implied,
    sharedPeers: shared,
    send: (m: Uint8Array, sent?: () => void) => {
      if (keep) rec.first ??= m;
      rec.bytes += m.length;
      rec.messages++;
      if (isFull(m)) rec.fulls++;
      sent?.();
    },
    close() {},
  });
  return rec;
}
const encoded = attach(ids[0]!, false, true).first!;
const full = fromBinary(SyncResponseSchema, encoded).full!;
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
  for (let i = 0; i < 10; i++) out = deflateSync(encoded, { level }).length;
  const ms = (performance.now() - t0) / 10;
  return { level, bytes: out, ratio: round(out / encoded.length, 3), ms: round(ms, 2) };
});
const cpuMs = (f: () => void) => {
  const t0 = process.cpuUsage();
  f();
  const t = process.cpuUsage(t0);
  return (t.user + t.system) / 1000;
};
const POLICY = JSON.stringify({
  tagOwners: { 'tag:a': [], 'tag:b': [] },
  acls: [{ action: 'accept', src: ['tag:a'], dst: ['tag:b:*'] }],
});
/** A policy change delivered to the attached sessions: bytes, messages, full netmaps among them, CPU. */
async function fanOut(recs: ReturnType<typeof attach>[], source: string) {
  const before = recs.map((r) => [r.bytes, r.messages, r.fulls] as const);
  await state.setPolicy('bench', 'mesh', source);
  const ms = cpuMs(() => mapper.flush());
  const sum = (i: 0 | 1 | 2, f: (r: (typeof recs)[0]) => number) =>
    recs.reduce((s, r, j) => s + f(r) - before[j]![i], 0);
  const bytes = sum(0, (r) => r.bytes);
  return {
    bytes,
    messages: sum(1, (r) => r.messages),
    fullNetmaps: sum(2, (r) => r.fulls),
    cpuMs: round(ms),
    projected: { bytes: Math.round((bytes * n) / k), cpuMs: round((ms * n) / k) },
  };
}
const forms: Record<string, unknown> = {};
for (const [name, implied, shared] of [
  ['full', false, false],
  ['implied', true, false],
  ['shared', true, true],
] as const) {
  global.gc?.();
  let recs: ReturnType<typeof attach>[] = [];
  const ms = cpuMs(() => {
    recs = ids.slice(0, k).map((id, i) => attach(id, implied, i === 0, shared));
  });
  const netmap = recs[0]!.first!;
  const level1 = deflateSync(netmap, { level: 1 });
  const t0 = performance.now();
  for (let i = 0; i < 10; i++) deflateSync(netmap, { level: 1 });
  forms[name] = {
    fullNetmapBytes: netmap.length,
    fullNetmapCpuMs: round(ms / k, 3),
    connectBytesProjected: netmap.length * n,
    deflateLevel1: {
      bytes: level1.length,
      ratio: round(level1.length / netmap.length, 3),
      ms: round((performance.now() - t0) / 10, 2),
    },
    policySet: await fanOut(recs, POLICY),
    policyRemoved: await fanOut(recs, ''),
  };
}

process.stdout.write(
  `${JSON.stringify({
    benchmark: 'netmap-bytes',
    nodes: n,
    sessions: k,
    fullNetmapBytes: encoded.length,
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
    forms,
  })}\n`,
);
mapper.close();
await store.close();
