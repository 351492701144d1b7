import {
  type Address,
  formatAddress,
  formatPrefix,
  hostPrefix,
  masked,
  type Prefix,
  parseAddress,
  parsePrefix,
} from './cidr.js';
import type { NodeSelector, PolicyNode } from './types.js';

export interface IndexedNode {
  node: PolicyNode;
  addresses: Address[];
  routes: Prefix[];
  /** The node's addresses as /32 and /128. */
  hostCidrs: readonly string[];
  /** hostCidrs and the approved routes: what `*` in dst opens on this node. */
  allCidrs: readonly string[];
}

/** The nodes a policy is compiled for, indexed by everything a selector can pick them by. */
export class NodeSet {
  readonly list: readonly IndexedNode[];
  private readonly indexes: readonly number[];
  private readonly byId = new Map<string, number>();
  private readonly byName = new Map<string, number[]>();
  private readonly byTag = new Map<string, number[]>();
  private readonly byOwner = new Map<string, number[]>();
  private readonly byAddress = new Map<string, number>();
  private readonly untagged: number[] = [];

  constructor(nodes: readonly PolicyNode[]) {
    this.list = nodes.map((node, i) => {
      this.byId.set(node.id, i);
      push(this.byName, node.name, i);
      push(this.byOwner, node.owner, i);
      for (const tag of node.tags) push(this.byTag, tag, i);
      if (node.tags.length === 0) this.untagged.push(i);
      const addresses = node.ips.map((ip) => {
        const address = parseAddress(ip);
        if (!address) throw new Error(`node ${node.id}: ${JSON.stringify(ip)} is not an IP address`);
        this.byAddress.set(formatAddress(address), i);
        return address;
      });
      const routes = (node.routes ?? []).map((route) => {
        const prefix = parsePrefix(route);
        if (!prefix) throw new Error(`node ${node.id}: route ${JSON.stringify(route)} is not a CIDR`);
        return masked(prefix);
      });
      const hostCidrs = Object.freeze(addresses.map((a) => formatPrefix(hostPrefix(a))));
      const allCidrs = Object.freeze([...hostCidrs, ...routes.map(formatPrefix)]);
      return { node, addresses, routes, hostCidrs, allCidrs };
    });
    this.indexes = this.list.map((_, i) => i);
  }

  get size(): number {
    return this.list.length;
  }

  indexOf(id: string): number | undefined {
    return this.byId.get(id);
  }

  at(index: number): IndexedNode {
    return this.list[index]!;
  }

  named(name: string): readonly number[] {
    return this.byName.get(name) ?? [];
  }

  tagged(tag: string): readonly number[] {
    return this.byTag.get(tag) ?? [];
  }

  ownedLike(index: number): readonly number[] {
    return this.byOwner.get(this.at(index).node.owner) ?? [];
  }

  owners(): Iterable<readonly number[]> {
    return this.byOwner.values();
  }

  withAddress(address: Address): number | undefined {
    return this.byAddress.get(formatAddress(address));
  }

  /** The nodes a selector picks by identity; address selectors pick none here. */
  picked(selector: NodeSelector): readonly number[] {
    switch (selector.kind) {
      case 'all':
        return this.indexes;
      case 'node':
        return this.named(selector.name);
      case 'tag':
        return this.tagged(selector.tag);
      case 'member':
        return this.untagged;
      case 'prefix':
        return [];
    }
  }
}

function push(map: Map<string, number[]>, key: string, index: number): void {
  const list = map.get(key);
  if (list) list.push(index);
  else map.set(key, [index]);
}
