import type { Address, Prefix } from './cidr.js';
import type { PolicyDocument } from './schema.js';

export type Protocol = 'tcp' | 'udp' | 'icmp';

export interface PortRange {
  first: number;
  last: number;
}

export interface PolicyNode {
  id: string;
  name: string;
  /** Mesh addresses without prefix, e.g. ["100.64.0.5", "fd7a:115c:a1e0::5"]. */
  ips: string[];
  /** e.g. ["tag:firewall"] */
  tags: string[];
  /** The auth key id the node joined with; autogroup:self pairs nodes of one owner. */
  owner: string;
  /** Approved subnet routes (CIDRs) the node serves. */
  routes?: string[];
}

/** A selector with groups and hosts resolved. */
export type NodeSelector =
  | { kind: 'all' }
  | { kind: 'node'; name: string }
  | { kind: 'tag'; tag: string }
  | { kind: 'member' }
  | { kind: 'prefix'; prefix: Prefix };

export type DstSelector = NodeSelector | { kind: 'self' };

export interface AclDestination {
  selector: DstSelector;
  /** Empty means every port. */
  ports: PortRange[];
}

export interface AclRule {
  src: NodeSelector[];
  /** One entry per selector: a group in `dst` becomes one entry per member, all with its ports. */
  dst: AclDestination[];
  /** Empty means tcp, udp and icmp. */
  protocols: Protocol[];
}

export type TestEndpoint =
  | { kind: 'node'; name: string }
  | { kind: 'tag'; tag: string }
  | { kind: 'address'; address: Address };

export interface PolicyTestCase {
  /** As written, e.g. `web:80`. */
  dst: string;
  endpoint: TestEndpoint;
  port: number;
  wantAccept: boolean;
}

export interface PolicyTest {
  /** As written. */
  src: string;
  endpoint: TestEndpoint;
  cases: PolicyTestCase[];
}

export interface Policy {
  /** The text as it was given, comments included, so that `policy get` returns what was set. */
  readonly source: string;
  /** The validated document, e.g. for tagOwners. */
  readonly document: PolicyDocument;
  readonly acls: readonly AclRule[];
  readonly tests: readonly PolicyTest[];
}

export interface FilterRuleSpec {
  srcCidrs: string[];
  /** Empty means any destination. */
  dstCidrs: string[];
  /** Empty means all ports. */
  ports: { first: number; last: number }[];
  /** Empty means tcp, udp and icmp. */
  protocols: Protocol[];
}

export interface CompiledPolicy {
  readonly allowAll: boolean;
  /** True when a may open connections to b or b to a (peer visibility is symmetric). */
  canSee(a: string, b: string): boolean;
  /** Ids of the nodes that `nodeId` may see (never itself), from the compiled node set. */
  visiblePeers(nodeId: string): string[];
  /**
   * The packet filter `nodeId` enforces for traffic arriving on its mesh interface. The arrays inside
   * are shared between nodes and frozen.
   */
  filterFor(nodeId: string): FilterRuleSpec[];
  /**
   * The group of nodes that see what `nodeId` sees: every node given the same
   * key sees exactly the group's members other than itself. Undefined for a
   * node outside the compiled set, and where a node's peers depend on the
   * node itself (autogroup:self).
   */
  peerGroup(nodeId: string): PeerGroup | undefined;
}

export interface PeerGroup {
  /** Equal for nodes of one compiled policy that see the same peers. */
  readonly key: string;
  /** Ids of the group's nodes, computed on each call. */
  members(): string[];
}

export interface PolicyTestOutcome {
  src: string;
  dst: string;
  wantAccept: boolean;
  passed: boolean;
  message: string;
}
