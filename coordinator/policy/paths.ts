import { RuleSet } from './compile.js';
import { NodeSet } from './nodes.js';
import type { Policy, PolicyNode } from './types.js';

/**
 * Whether some other node of the set may open a TCP connection to `target` on `port` under `policy`
 * (null: no policy, everyone reaches everyone). A node that closes a port everywhere but on the mesh is
 * reachable on it only along such a path.
 */
export class TcpPaths {
  private readonly nodes: NodeSet;
  private readonly rules: RuleSet | null;

  constructor(policy: Policy | null, nodes: readonly PolicyNode[]) {
    this.nodes = new NodeSet(nodes);
    this.rules = policy ? new RuleSet(policy, this.nodes) : null;
  }

  hasPath(target: string, port: number): boolean {
    const i = this.nodes.indexOf(target);
    if (i === undefined) return false;
    if (!this.rules) return this.nodes.size > 1;
    const dst = { index: i, addresses: this.nodes.at(i).addresses };
    return this.nodes.list.some(
      (n, j) => j !== i && this.rules!.allows({ index: j, addresses: n.addresses }, dst, port, 'tcp'),
    );
  }
}
