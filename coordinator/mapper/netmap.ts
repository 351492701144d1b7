// Turns the state's records into the protobuf shapes an agent receives.
import { createHash } from 'node:crypto';
import { create, toBinary } from '@bufbuild/protobuf';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import {
  type DesiredRelease,
  DesiredReleaseSchema,
  type DnsRecord,
  DnsRecordSchema,
  FilterRuleSchema,
  NetMapSchema,
  type Node,
  NodeSchema,
  PacketFilterSchema,
  type Peer,
  PeerSchema,
  Protocol,
  RelayInfoSchema,
} from '../../proto/gen/meshgate/v1/types_pb.js';
import type { FilterRuleSpec } from '../policy/index.js';
import type { NodeRecord } from '../state/records.js';
import type { DesiredVersionRecord, State } from '../state/state.js';
import { assemble, deflate, type Piece } from './wire.js';

export interface NetMapOptions {
  keepaliveSeconds: number;
  relay: boolean;
  domainSuffix: string;
}

/** What a node needs to fetch and check its desired release; undefined without one. */
export function desiredReleaseMessage(v: DesiredVersionRecord | undefined): DesiredRelease | undefined {
  if (!v) return undefined;
  return create(DesiredReleaseSchema, {
    version: v.version,
    artifactUrl: v.artifactUrl || `/releases/${v.version}/meshgate-${v.version}.mjs`,
    sha256: v.sha256,
    manifest: v.manifest,
    allowDowngrade: v.allowDowngrade,
    setAt: timestampFromMs(v.updatedAt),
  });
}

export function nodeMessage(state: State, n: NodeRecord): Node {
  return create(NodeSchema, {
    id: n.id,
    name: n.name,
    project: n.project,
    ipAddresses: [n.ipv4, n.ipv6],
    online: state.isOnline(n.id),
    lastSeen: n.lastSeen === null ? undefined : timestampFromMs(n.lastSeen),
    createdAt: timestampFromMs(n.createdAt),
    version: n.version,
    desiredVersion: state.desiredVersionFor(n),
    drifting: state.isDrifting(n),
    tags: n.tags,
    ephemeral: n.ephemeral,
    machineKey: `mkey:${n.machineKey}`,
    nodeKey: n.nodeKey,
    endpoints: state.endpointsOf(n),
    expiresAt: n.expiresAt === null ? undefined : timestampFromMs(n.expiresAt),
    expired: state.isExpired(n),
    os: n.os,
    hostname: n.hostname,
    advertisedRoutes: n.advertisedRoutes,
    approvedRoutes: n.approvedRoutes,
    authKeyId: n.authKeyId,
    lockdownPorts: n.lockdownPorts,
    keySetAt: timestampFromMs(n.keySetAt),
    keyExpired: state.isKeyExpired(n),
  });
}

/**
 * `implied`: for agents that understand IMPLIED_PEER_FIELDS, without the
 * allowed IPs that repeat the peer's addresses.
 */
export function peerMessage(state: State, n: NodeRecord, relay: boolean, implied = false): Peer {
  return create(PeerSchema, {
    id: n.id,
    name: n.name,
    nodeKey: n.nodeKey,
    ipAddresses: [n.ipv4, n.ipv6],
    allowedIps: implied ? n.approvedRoutes : [`${n.ipv4}/32`, `${n.ipv6}/128`, ...n.approvedRoutes],
    endpoints: state.endpointsOf(n),
    online: state.isOnline(n.id),
    tags: n.tags,
    lastSeen: n.lastSeen === null ? undefined : timestampFromMs(n.lastSeen),
    version: n.version,
    relay,
  });
}

export function domainOf(project: string, opts: NetMapOptions): string {
  return `${project}.${opts.domainSuffix}`;
}

export function dnsRecord(n: NodeRecord, domain: string): DnsRecord {
  return create(DnsRecordSchema, { name: `${n.name}.${domain}`, ipAddresses: [n.ipv4, n.ipv6] });
}

/**
 * A rule's sources, encoded, with a digest of them. With a policy, a rule's
 * sources are one array shared by every node the rule opens, and can hold
 * the addresses of thousands of nodes; encoding or comparing them again for
 * every node was the bulk of a policy change in a large project.
 */
interface Sources {
  bytes: Uint8Array;
  digest: string;
  /** The same as the field shared_src_cidrs, once asked for. */
  shared?: Uint8Array;
}

const sources = new WeakMap<readonly string[], Sources>();

function sourcesOf(cidrs: readonly string[]): Sources {
  let s = sources.get(cidrs);
  if (!s) {
    const bytes = toBinary(FilterRuleSchema, create(FilterRuleSchema, { srcCidrs: [...cidrs] }));
    s = { bytes, digest: createHash('sha256').update(bytes).digest('base64') };
    sources.set(cidrs, s);
  }
  return s;
}

/**
 * Below this many encoded bytes, a rule's sources go as they are: a few
 * addresses do not compress, and every node's filter has a rule for any
 * address (the two prefixes of everything).
 */
const SHARED_SOURCES_MIN_BYTES = 512;

/** The rule's sources as fields of a FilterRule; compressed once, for streams that take shared peers. */
function sourcesField(cidrs: readonly string[], shared: boolean): Uint8Array {
  const s = sourcesOf(cidrs);
  if (!shared || s.bytes.length < SHARED_SOURCES_MIN_BYTES) return s.bytes;
  s.shared ??= assemble([
    { field: FilterRuleSchema.field.sharedSrcCidrs.number, elements: [deflate(s.bytes)] },
  ]);
  return s.shared;
}

const PROTOCOLS = { tcp: Protocol.TCP, udp: Protocol.UDP, icmp: Protocol.ICMP } as const;
const RULES = PacketFilterSchema.field.rules.number;

/**
 * A PacketFilter's fields, as pieces of the message that carries it.
 * `shared`: for a stream that takes shared peers, long source lists compressed.
 */
export function filterPieces(rules: FilterRuleSpec[], shared = false): Piece[] {
  return rules.map((r) => ({
    field: RULES,
    message: [
      sourcesField(r.srcCidrs, shared),
      toBinary(
        FilterRuleSchema,
        create(FilterRuleSchema, {
          dstCidrs: r.dstCidrs,
          ports: r.ports,
          protocols: r.protocols.map((p) => PROTOCOLS[p]),
        }),
      ),
    ],
  }));
}

/** Equal for equal filters, whichever policy compiled them. */
export function filterKey(rules: FilterRuleSpec[]): string {
  return rules
    .map((r) => `${sourcesOf(r.srcCidrs).digest}${JSON.stringify([r.dstCidrs, r.ports, r.protocols])}`)
    .join('|');
}

/**
 * A node as its peers receive it, each form encoded when first asked for and
 * reused until the node changes (the owner drops it then).
 */
export class EncodedPeer {
  private full: Uint8Array | undefined;
  private short: Uint8Array | undefined;
  private record: Uint8Array | undefined;

  constructor(
    private readonly state: State,
    private readonly node: NodeRecord,
    private readonly opts: NetMapOptions,
  ) {}

  /** `implied`: without what IMPLIED_PEER_FIELDS lets the agent reconstruct. */
  peer(implied: boolean): Uint8Array {
    if (implied) {
      this.short ??= toBinary(PeerSchema, peerMessage(this.state, this.node, this.opts.relay, true));
      return this.short;
    }
    this.full ??= toBinary(PeerSchema, peerMessage(this.state, this.node, this.opts.relay));
    return this.full;
  }

  dns(): Uint8Array {
    this.record ??= toBinary(DnsRecordSchema, dnsRecord(this.node, domainOf(this.node.project, this.opts)));
    return this.record;
  }
}

const NETMAP = NetMapSchema.field;

/**
 * A node's netmap as pieces of the message that carries it. `implied`: in
 * the form for agents that understand IMPLIED_PEER_FIELDS, whose DNS records
 * are the node's own alone. `shared`: the compressed peers of the node's
 * group (SHARED_PEERS), which `peers` then only update. `sharedSources`:
 * long source lists of the packet filter compressed, for such a stream.
 */
export function netMapPieces(
  state: State,
  self: NodeRecord,
  opts: NetMapOptions,
  rules: FilterRuleSpec[],
  peers: EncodedPeer[],
  implied: boolean,
  shared?: Uint8Array,
  sharedSources = false,
): Piece[] {
  const domain = domainOf(self.project, opts);
  const head = create(NetMapSchema, {
    self: nodeMessage(state, self),
    dns: [dnsRecord(self, domain)],
    desiredVersion: state.desiredEntryFor(self)?.version ?? '',
    desiredRelease: desiredReleaseMessage(state.desiredEntryFor(self)),
    domain,
    keepaliveSeconds: opts.keepaliveSeconds,
    relay: create(RelayInfoSchema, { enabled: opts.relay }),
  });
  return [
    toBinary(NetMapSchema, head),
    { field: NETMAP.packetFilter.number, message: filterPieces(rules, sharedSources) },
    { field: NETMAP.peers.number, elements: peers.map((p) => p.peer(implied)) },
    ...(implied ? [] : [{ field: NETMAP.dns.number, elements: peers.map((p) => p.dns()) }]),
    ...(shared ? [{ field: NETMAP.sharedPeers.number, elements: [shared] }] : []),
  ];
}

/** The peers of `nodes` as the `peers` field of an encoded NetMap, in the implied form. */
export function sharedPeersPiece(nodes: EncodedPeer[]): Piece {
  return { field: NETMAP.peers.number, elements: nodes.map((p) => p.peer(true)) };
}
