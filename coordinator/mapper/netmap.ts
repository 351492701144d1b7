// Turns the state's records into the protobuf shapes an agent receives.
import { create, type MessageInitShape } from '@bufbuild/protobuf';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import {
  type DnsRecord,
  DnsRecordSchema,
  type FilterRule,
  FilterRuleSchema,
  type NetMapSchema,
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
import type { State } from '../state/state.js';

export interface NetMapOptions {
  keepaliveSeconds: number;
  relay: boolean;
  domainSuffix: string;
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
  });
}

export function peerMessage(state: State, n: NodeRecord, relay: boolean): Peer {
  return create(PeerSchema, {
    id: n.id,
    name: n.name,
    nodeKey: n.nodeKey,
    ipAddresses: [n.ipv4, n.ipv6],
    allowedIps: [`${n.ipv4}/32`, `${n.ipv6}/128`, ...n.approvedRoutes],
    endpoints: state.endpointsOf(n),
    online: state.isOnline(n.id),
    tags: n.tags,
    lastSeen: n.lastSeen === null ? undefined : timestampFromMs(n.lastSeen),
    version: n.version,
    relay,
  });
}

const PROTOCOLS = { tcp: Protocol.TCP, udp: Protocol.UDP, icmp: Protocol.ICMP } as const;

export function filterMessage(rules: FilterRuleSpec[]): FilterRule[] {
  return rules.map((r) =>
    create(FilterRuleSchema, {
      srcCidrs: r.srcCidrs,
      dstCidrs: r.dstCidrs,
      ports: r.ports,
      protocols: r.protocols.map((p) => PROTOCOLS[p]),
    }),
  );
}

export function domainOf(project: string, opts: NetMapOptions): string {
  return `${project}.${opts.domainSuffix}`;
}

export function dnsRecord(n: NodeRecord, domain: string): DnsRecord {
  return create(DnsRecordSchema, { name: `${n.name}.${domain}`, ipAddresses: [n.ipv4, n.ipv6] });
}

/** The singular fields of a node's netmap; its peers and their DNS records are added as encoded pieces. */
export function netMapHead(
  state: State,
  self: NodeRecord,
  opts: NetMapOptions,
): MessageInitShape<typeof NetMapSchema> {
  const domain = domainOf(self.project, opts);
  return {
    self: nodeMessage(state, self),
    packetFilter: create(PacketFilterSchema, {
      rules: filterMessage(state.compiled(self.project).filterFor(self.id)),
    }),
    dns: [dnsRecord(self, domain)],
    desiredVersion: state.desiredVersionFor(self),
    domain,
    keepaliveSeconds: opts.keepaliveSeconds,
    relay: create(RelayInfoSchema, { enabled: opts.relay }),
  };
}
