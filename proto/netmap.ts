// Applies the coordinator's sync messages to a netmap. The agent keeps its
// view this way; so do the simulated agents of tests and benchmarks.
import { inflateRawSync } from 'node:zlib';
import { create, type DescMessage, fromBinary, type MessageShape } from '@bufbuild/protobuf';
import { type SyncResponse, SyncResponseSchema } from './gen/meshgate/v1/control_pb.js';
import {
  DnsRecordSchema,
  FilterRuleSchema,
  type NetMap,
  NetMapSchema,
  type PacketFilter,
  type Peer,
  type PeerPatch,
} from './gen/meshgate/v1/types_pb.js';

/**
 * The metadata header in which an agent lists, comma-separated, what it
 * understands of the netmap encoding when it opens its sync stream. A
 * coordinator that does not know the header, or an agent that does not send
 * it, keeps to the full form.
 */
export const NETMAP_FEATURES_HEADER = 'meshgate-netmap-features';
/**
 * Peers leave out what follows from their other fields: allowed IPs that are
 * the peer's own addresses (as /32 and /128), and the DNS records of a full
 * netmap that give a peer's name and addresses. At 10,000 peers that is 38 %
 * of a full netmap.
 */
export const IMPLIED_PEER_FIELDS = 'implied-peer-fields';
/**
 * What many agents receive alike may come compressed, the same bytes for
 * each: a full netmap's peers as `shared_peers` (those of the node's group),
 * parts of a delta as `shared`, and a filter rule's long source list as
 * `shared_src_cidrs`. Announced together with IMPLIED_PEER_FIELDS, whose
 * form the shared peers are in.
 */
export const SHARED_PEERS = 'shared-peers';
/**
 * The most the compressed parts of one sync message may inflate to,
 * together: 100,000 peers of 200 bytes, ten times the largest project
 * measured. A message whose parts would inflate further is refused rather
 * than allowed to exhaust the agent's memory, however many parts it has.
 */
export const MAX_SHARED_PEERS_BYTES = 20 * 1024 * 1024;

/** A netmap the agent cannot use: the stream is dropped and opened again. */
export class NetmapError extends Error {
  override name = 'NetmapError';
}

/**
 * Whether the values of NETMAP_FEATURES_HEADER name `feature`. Unknown
 * features are ignored, and so is anything longer than a list of them could be.
 */
export function hasNetmapFeature(values: readonly (string | Buffer)[], feature: string): boolean {
  return values.some(
    (v) => typeof v === 'string' && v.length <= 256 && v.split(',').some((f) => f.trim() === feature),
  );
}

const hostCidr = (address: string): string => (address.includes(':') ? `${address}/128` : `${address}/32`);

/** The peer with its own addresses among its allowed IPs, first, as the full form has them. */
export function withImpliedAllowedIps(p: Peer): Peer {
  const own = p.ipAddresses.map(hostCidr);
  const missing = own.filter((c) => !p.allowedIps.includes(c));
  return missing.length ? { ...p, allowedIps: [...missing, ...p.allowedIps] } : p;
}

/**
 * The netmap with a DNS record for every peer that has none, after the
 * records it carries, in peer order, as the full form has them. Unchanged for
 * a netmap in the full form.
 */
export function withImpliedFields(m: NetMap): NetMap {
  let expanded = false;
  const peers = m.peers.map((p) => {
    const q = withImpliedAllowedIps(p);
    if (q !== p) expanded = true;
    return q;
  });
  const named = new Set(m.dns.map((r) => r.name));
  const implied = [];
  for (const p of peers) {
    const name = `${p.name}.${m.domain}`;
    if (!named.has(name)) implied.push(create(DnsRecordSchema, { name, ipAddresses: [...p.ipAddresses] }));
  }
  if (!expanded && !implied.length) return m;
  return { ...m, peers, dns: implied.length ? [...m.dns, ...implied] : m.dns };
}

/** What the compressed parts of one sync message may still inflate to. */
export class InflateBudget {
  left = MAX_SHARED_PEERS_BYTES;
}

/**
 * A compressed part of a sync message, inflated within `budget` and decoded;
 * NetmapError if it cannot be, or would take more than the budget has left.
 */
function decodeCompressed<T extends DescMessage>(
  schema: T,
  bytes: Uint8Array,
  what: string,
  budget: InflateBudget,
): MessageShape<T> {
  let raw: Buffer;
  try {
    // zlib takes no limit below one byte: an empty part still inflates then.
    raw = inflateRawSync(bytes, { maxOutputLength: Math.max(1, budget.left) });
  } catch (err) {
    throw new NetmapError(`${what} do not inflate: ${(err as Error).message}`);
  }
  budget.left -= raw.length;
  try {
    return fromBinary(schema, raw);
  } catch (err) {
    throw new NetmapError(`${what} do not decode: ${(err as Error).message}`);
  }
}

/**
 * The delta with the lists of its shared parts before its own, without
 * the receiving node `selfId` among the changed peers. Unchanged without
 * shared parts.
 */
export function withSharedDelta(
  msg: SyncResponse,
  selfId: string | undefined,
  budget = new InflateBudget(),
): SyncResponse {
  if (!msg.shared.length) return msg;
  const removed: string[] = [];
  const changed: Peer[] = [];
  const patches: PeerPatch[] = [];
  for (const part of msg.shared) {
    const s = decodeCompressed(SyncResponseSchema, part, "the delta's shared parts", budget);
    removed.push(...s.peersRemoved);
    for (const p of s.peersChanged) if (p.id !== selfId) changed.push(p);
    patches.push(...s.peerPatches);
  }
  return {
    ...msg,
    peersRemoved: [...removed, ...msg.peersRemoved],
    peersChanged: [...changed, ...msg.peersChanged],
    peerPatches: [...patches, ...msg.peerPatches],
    shared: [],
  };
}

/** The filter with the compressed sources of its rules among their own; unchanged without any. */
export function withSharedSources(
  filter: PacketFilter | undefined,
  budget = new InflateBudget(),
): PacketFilter | undefined {
  if (!filter?.rules.some((r) => r.sharedSrcCidrs.length)) return filter;
  return {
    ...filter,
    rules: filter.rules.map((r) => {
      if (!r.sharedSrcCidrs.length) return r;
      const what = "the packet filter's shared sources";
      const shared = decodeCompressed(FilterRuleSchema, r.sharedSrcCidrs, what, budget);
      return { ...r, srcCidrs: [...shared.srcCidrs, ...r.srcCidrs], sharedSrcCidrs: new Uint8Array(0) };
    }),
  };
}

export class SequenceError extends Error {
  override name = 'SequenceError';
}

/**
 * The netmap with the peers of `shared_peers` among its own: in the order of
 * the shared peers, each replaced by the peer of the same id that the netmap
 * carries (a newer one), without the node itself; then the netmap's peers
 * that are not among the shared ones. Unchanged without shared peers.
 */
export function withSharedPeers(m: NetMap, budget = new InflateBudget()): NetMap {
  if (!m.sharedPeers.length) return m;
  const shared = decodeCompressed(NetMapSchema, m.sharedPeers, "the netmap's shared peers", budget).peers;
  const own = new Map(m.peers.map((p) => [p.id, p]));
  const selfId = m.self?.id;
  const peers: Peer[] = [];
  for (const p of shared) {
    if (p.id === selfId) continue;
    const newer = own.get(p.id);
    peers.push(newer ?? p);
    own.delete(p.id);
  }
  for (const p of own.values()) peers.push(p);
  return { ...m, peers, sharedPeers: new Uint8Array(0) };
}

/**
 * Returns the netmap after `msg`. Keepalives return `current` unchanged.
 * A delta without a prior full netmap, or out of sequence, is an error:
 * the caller must reconnect to get a fresh full map.
 */
export function applySync(current: NetMap | null, lastSeq: bigint, received: SyncResponse): NetMap | null {
  let msg = received;
  if (msg.seq !== lastSeq + 1n && !(msg.full && msg.seq === 1n)) {
    throw new SequenceError(`sync message ${msg.seq} after ${lastSeq}`);
  }
  // One budget for every compressed part of the message.
  const budget = new InflateBudget();
  if (msg.full) {
    const full = withSharedPeers(msg.full, budget);
    const packetFilter = withSharedSources(full.packetFilter, budget);
    return withImpliedFields(packetFilter === full.packetFilter ? full : { ...full, packetFilter });
  }
  if (msg.keepalive) return current;
  if (!current) throw new SequenceError('delta before the first full netmap');
  msg = withSharedDelta(msg, current.self?.id, budget);
  // Netmaps are values: the result shares every unchanged peer with `current`
  // and copies only the patched ones. A deep copy per message cost 45-90 ms at
  // 10,000 peers.
  const next: NetMap = { ...current };
  if (msg.peersRemoved.length || msg.peersChanged.length || msg.peerPatches.length) {
    const byId = new Map<string, Peer>(current.peers.map((p) => [p.id, p]));
    for (const id of msg.peersRemoved) byId.delete(id);
    for (const p of msg.peersChanged) byId.set(p.id, withImpliedAllowedIps(p));
    for (const patch of msg.peerPatches) {
      const p = byId.get(patch.id);
      if (!p) continue;
      byId.set(patch.id, {
        ...p,
        online: patch.online ?? p.online,
        lastSeen: patch.lastSeen ?? p.lastSeen,
        endpoints: patch.endpointsChanged ? patch.endpoints : p.endpoints,
      });
    }
    next.peers = [...byId.values()];
  }
  if (msg.packetFilter) next.packetFilter = withSharedSources(msg.packetFilter, budget);
  if (msg.desiredVersion !== undefined) {
    next.desiredVersion = msg.desiredVersion;
    next.desiredRelease = msg.desiredRelease;
  }
  if (msg.self) next.self = msg.self;
  if (msg.dnsChanged) next.dns = msg.dns;
  return next;
}
