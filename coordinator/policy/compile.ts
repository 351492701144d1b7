import { type Address, contains, formatPrefix, intersection, type Prefix } from './cidr.js';
import { mergePorts } from './grammar.js';
import { type IndexedNode, NodeSet } from './nodes.js';
import type {
  AclRule,
  CompiledPolicy,
  DstSelector,
  FilterRuleSpec,
  PeerGroup,
  Policy,
  PolicyNode,
  PortRange,
  Protocol,
} from './types.js';

/**
 * Compiles a policy for a set of nodes. Without a policy everyone may reach everyone, which is answered
 * without looking at pairs of nodes; with one, every rule is matched against every node once, here.
 */
export function compilePolicy(policy: Policy | null, nodes: PolicyNode[]): CompiledPolicy {
  return policy ? new RuleSet(policy, new NodeSet(nodes)) : new OpenPolicy(nodes);
}

class OpenPolicy implements CompiledPolicy {
  readonly allowAll = true;
  private readonly nodes: readonly PolicyNode[];
  private readonly ids: ReadonlySet<string>;

  constructor(nodes: readonly PolicyNode[]) {
    this.nodes = [...nodes];
    this.ids = new Set(nodes.map((n) => n.id));
  }

  canSee(a: string, b: string): boolean {
    return a !== b && this.ids.has(a) && this.ids.has(b);
  }

  visiblePeers(nodeId: string): string[] {
    return this.ids.has(nodeId) ? this.nodes.filter((n) => n.id !== nodeId).map((n) => n.id) : [];
  }

  peerGroup(nodeId: string): PeerGroup | undefined {
    return this.ids.has(nodeId) ? { key: '*', members: () => this.nodes.map((n) => n.id) } : undefined;
  }

  filterFor(nodeId: string): FilterRuleSpec[] {
    // WireGuard accepts packets only from the addresses of known peers, so the filter need not repeat them.
    return this.ids.has(nodeId) ? [{ srcCidrs: [...ANY], dstCidrs: [], ports: [], protocols: [] }] : [];
  }
}

const ANY: readonly string[] = Object.freeze(['0.0.0.0/0', '::/0']);
const ANY_PREFIXES: Prefix[] = [
  { family: 4, bytes: new Uint8Array(4), length: 0 },
  { family: 6, bytes: new Uint8Array(16), length: 0 },
];

interface Destination {
  selector: DstSelector;
  /** For selectors that pick nodes by identity: names, tags, autogroup:member and `*`. */
  picked?: Uint8Array;
  ports: PortRange[];
}

interface Rule {
  protocols: Protocol[];
  /** Sources picked by identity; autogroup:self pairs only these, as an address carries no owner. */
  picked: Uint8Array;
  /** Literal source CIDRs; `*` adds 0.0.0.0/0 and ::/0. */
  srcPrefixes: Prefix[];
  srcCidrs: string[];
  destinations: Destination[];
  hasSelf: boolean;
  /**
   * Peer visibility: a node is a source when picked, when one of its addresses is in a source CIDR, or
   * when it routes a subnet that overlaps one (traffic from there comes through it); likewise destinations,
   * except autogroup:self, which depends on the source and is checked through owners.
   */
  seeSrc: Uint8Array;
  seeSrcList: number[];
  seeDst: Uint8Array;
  seeDstList: number[];
}

/** What one rule destination opens on one node. */
interface Grant {
  rule: Rule;
  self: boolean;
  dstCidrs: string[];
  ports: PortRange[];
  /** Grants with equal keys have equal sources, destinations and protocols, so their ports merge. */
  key: string;
}

/** A source or destination of a policy test: a node, or an address no node has. */
export interface Endpoint {
  index?: number;
  addresses: Address[];
}

/** What one address selector means for the nodes: its text, the nodes it overlaps, what it opens on each. */
interface PrefixMatch {
  cidr: string;
  overlaps: number[];
  within: { index: number; cidrs: string[] }[];
}

export class RuleSet implements CompiledPolicy {
  readonly allowAll = false;
  private readonly rules: Rule[];
  /** By node index. */
  private readonly grants: Grant[][];
  /**
   * By prefix object. A group's selectors are shared by every rule that names it, so a prefix is matched
   * against the nodes once, not once per rule: compiling costs the policy's selectors plus its distinct
   * prefixes times the nodes, not their product.
   */
  private readonly prefixes = new Map<Prefix, PrefixMatch>();

  constructor(
    policy: Policy,
    readonly nodes: NodeSet,
  ) {
    this.grants = nodes.list.map(() => []);
    const srcKeys = new Map<string, number>();
    this.rules = policy.acls.map((acl, r) => {
      const rule = this.compileSources(acl);
      const srcText = rule.srcCidrs.join(',');
      const srcKey = srcKeys.get(srcText) ?? srcKeys.size;
      srcKeys.set(srcText, srcKey);
      this.compileDestinations(rule, acl, `${srcKey}|${acl.protocols.join(',')}`, `self${r}`);
      return rule;
    });
  }

  canSee(a: string, b: string): boolean {
    const i = this.nodes.indexOf(a);
    const j = this.nodes.indexOf(b);
    if (i === undefined || j === undefined || i === j) return false;
    const sameOwner = this.nodes.at(i).node.owner === this.nodes.at(j).node.owner;
    return this.rules.some(
      (rule) =>
        (rule.seeSrc[i] === 1 && rule.seeDst[j] === 1) ||
        (rule.seeSrc[j] === 1 && rule.seeDst[i] === 1) ||
        (rule.hasSelf && sameOwner && (rule.picked[i] === 1 || rule.picked[j] === 1)),
    );
  }

  visiblePeers(nodeId: string): string[] {
    const i = this.nodes.indexOf(nodeId);
    if (i === undefined) return [];
    const seen = new Set<number>();
    const add = (list: readonly number[]) => {
      for (const j of list) seen.add(j);
    };
    for (const rule of this.rules) {
      if (rule.seeSrc[i] === 1) add(rule.seeDstList);
      if (rule.seeDst[i] === 1) add(rule.seeSrcList);
      if (rule.hasSelf)
        add(this.nodes.ownedLike(i).filter((j) => rule.picked[i] === 1 || rule.picked[j] === 1));
    }
    seen.delete(i);
    return Array.from(seen, (j) => this.nodes.at(j).node.id);
  }

  /**
   * Without autogroup:self a node's peers are the union of the lists of the
   * rules it is a source or a destination of, so nodes that are so in the
   * same rules see the same peers; the union holds the node itself only when
   * a rule lets it see its own kind, and visiblePeers leaves it out.
   */
  peerGroup(nodeId: string): PeerGroup | undefined {
    const i = this.nodes.indexOf(nodeId);
    if (i === undefined || this.rules.some((r) => r.hasSelf)) return undefined;
    let key = '';
    for (const rule of this.rules) key += `${rule.seeSrc[i]}${rule.seeDst[i]}`;
    return {
      key,
      members: () => {
        const seen = new Set<number>();
        for (const rule of this.rules) {
          if (rule.seeSrc[i] === 1) for (const j of rule.seeDstList) seen.add(j);
          if (rule.seeDst[i] === 1) for (const j of rule.seeSrcList) seen.add(j);
        }
        return Array.from(seen, (j) => this.nodes.at(j).node.id);
      },
    };
  }

  filterFor(nodeId: string): FilterRuleSpec[] {
    const i = this.nodes.indexOf(nodeId);
    if (i === undefined) return [];
    const merged = new Map<string, FilterRuleSpec>();
    for (const grant of this.grants[i]!) {
      const spec = merged.get(grant.key);
      if (spec) {
        spec.ports =
          spec.ports.length === 0 || grant.ports.length === 0
            ? []
            : mergePorts([...spec.ports, ...grant.ports]);
        continue;
      }
      const srcCidrs = grant.self ? this.sameOwnerSources(grant.rule, i) : grant.rule.srcCidrs;
      merged.set(grant.key, {
        srcCidrs,
        dstCidrs: grant.dstCidrs,
        ports: grant.ports,
        protocols: grant.rule.protocols,
      });
    }
    return [...merged.values()];
  }

  /** Whether `protocol` traffic from src may reach dst on `port`, judged by the compiled rules. */
  allows(src: Endpoint, dst: Endpoint, port: number, protocol: Protocol): boolean {
    return ([4, 6] as const).some((family) => {
      const from = src.addresses.filter((a) => a.family === family);
      const to = dst.addresses.filter((a) => a.family === family);
      if (from.length === 0 || to.length === 0) return false;
      return this.rules.some((rule) => {
        if (rule.protocols.length > 0 && !rule.protocols.includes(protocol)) return false;
        const picked = src.index !== undefined && rule.picked[src.index] === 1;
        if (!picked && !from.some((a) => rule.srcPrefixes.some((p) => contains(p, a)))) return false;
        return rule.destinations.some(
          (d) =>
            (d.ports.length === 0 || d.ports.some((r) => r.first <= port && port <= r.last)) &&
            this.reaches(d, picked, src, dst, to),
        );
      });
    });
  }

  private reaches(d: Destination, picked: boolean, src: Endpoint, dst: Endpoint, to: Address[]): boolean {
    switch (d.selector.kind) {
      case 'all':
        return true;
      case 'prefix': {
        const prefix = d.selector.prefix;
        return to.some((a) => contains(prefix, a));
      }
      case 'self':
        return (
          picked &&
          dst.index !== undefined &&
          dst.index !== src.index &&
          this.nodes.at(dst.index).node.owner === this.nodes.at(src.index!).node.owner
        );
      default:
        return dst.index !== undefined && d.picked![dst.index] === 1;
    }
  }

  private sameOwnerSources(rule: Rule, i: number): string[] {
    return this.nodes
      .ownedLike(i)
      .filter((j) => j !== i && rule.picked[j] === 1)
      .flatMap((j) => this.nodes.at(j).hostCidrs);
  }

  private prefixMatch(prefix: Prefix): PrefixMatch {
    let m = this.prefixes.get(prefix);
    if (!m) {
      m = { cidr: formatPrefix(prefix), overlaps: [], within: [] };
      for (let i = 0; i < this.nodes.size; i++) {
        const node = this.nodes.at(i);
        if (overlapsNode(prefix, node)) m.overlaps.push(i);
        const cidrs = cidrsWithin(prefix, node);
        if (cidrs.length > 0) m.within.push({ index: i, cidrs });
      }
      this.prefixes.set(prefix, m);
    }
    return m;
  }

  private compileSources(acl: AclRule): Rule {
    const n = this.nodes.size;
    const picked = new Uint8Array(n);
    let srcPrefixes: Prefix[] = [];
    for (const selector of acl.src) {
      if (selector.kind === 'prefix') srcPrefixes.push(selector.prefix);
      for (const i of this.nodes.picked(selector)) picked[i] = 1;
    }
    const wildcard = acl.src.some((s) => s.kind === 'all');
    // With `*` every address is a source; listing the nodes' own addresses too would only grow filters.
    if (wildcard) srcPrefixes = ANY_PREFIXES;
    const cidrs = new Set<string>(srcPrefixes.map((p) => this.prefixMatch(p).cidr));
    const seeSrc = picked.slice();
    for (let i = 0; i < n; i++) {
      if (picked[i] === 1 && !wildcard) for (const cidr of this.nodes.at(i).hostCidrs) cidrs.add(cidr);
    }
    for (const p of srcPrefixes) for (const i of this.prefixMatch(p).overlaps) seeSrc[i] = 1;
    return {
      protocols: frozen([...acl.protocols]),
      picked,
      srcPrefixes,
      srcCidrs: frozen([...cidrs].sort()),
      destinations: [],
      hasSelf: false,
      seeSrc,
      seeSrcList: indexesOf(seeSrc),
      seeDst: new Uint8Array(n),
      seeDstList: [],
    };
  }

  private compileDestinations(rule: Rule, acl: AclRule, key: string, selfKey: string): void {
    if (rule.srcCidrs.length === 0) return;
    for (const { selector, ports: portList } of acl.dst) {
      const ports = frozen(portList.map((p) => Object.freeze({ ...p })));
      const destination: Destination = { selector, ports };
      rule.destinations.push(destination);
      const grant = (i: number, dstCidrs: readonly string[], self: boolean) => {
        const dst = frozen([...dstCidrs]);
        this.grants[i]!.push({
          rule,
          self,
          dstCidrs: dst,
          ports,
          key: `${self ? selfKey : key}|${dst.join(',')}`,
        });
      };
      if (selector.kind === 'self') {
        rule.hasSelf = true;
        for (const owned of this.nodes.owners()) {
          const sources = owned.filter((i) => rule.picked[i] === 1).length;
          for (const i of owned) {
            if (sources - (rule.picked[i] ?? 0) > 0) grant(i, this.nodes.at(i).hostCidrs, true);
          }
        }
        continue;
      }
      const open = (i: number, dstCidrs: readonly string[]) => {
        if (dstCidrs.length === 0) return;
        rule.seeDst[i] = 1;
        grant(i, dstCidrs, false);
      };
      if (selector.kind === 'prefix') {
        for (const { index, cidrs } of this.prefixMatch(selector.prefix).within) open(index, cidrs);
        continue;
      }
      destination.picked = new Uint8Array(this.nodes.size);
      for (const i of this.nodes.picked(selector)) {
        destination.picked[i] = 1;
        const node = this.nodes.at(i);
        open(i, selector.kind === 'all' ? node.allCidrs : node.hostCidrs);
      }
    }
    rule.seeDstList = indexesOf(rule.seeDst);
  }
}

/** The part of `prefix` a node answers for: its own addresses in it, and where it overlaps the node's routes. */
function cidrsWithin(prefix: Prefix, node: IndexedNode): string[] {
  const cidrs: string[] = [];
  node.addresses.forEach((a, k) => {
    if (contains(prefix, a)) cidrs.push(node.hostCidrs[k]!);
  });
  for (const route of node.routes) {
    const overlap = intersection(prefix, route);
    if (overlap) cidrs.push(formatPrefix(overlap));
  }
  return cidrs;
}

function overlapsNode(prefix: Prefix, node: IndexedNode): boolean {
  return node.addresses.some((a) => contains(prefix, a)) || node.routes.some((r) => intersection(prefix, r));
}

function indexesOf(bits: Uint8Array): number[] {
  const list: number[] = [];
  bits.forEach((bit, i) => {
    if (bit === 1) list.push(i);
  });
  return list;
}

/** Filter arrays are shared by every node that gets them; freezing keeps one caller from changing another's. */
function frozen<T>(items: T[]): T[] {
  Object.freeze(items);
  return items;
}
