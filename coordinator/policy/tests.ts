import { type Endpoint, RuleSet } from './compile.js';
import { quote } from './grammar.js';
import { NodeSet } from './nodes.js';
import type {
  Policy,
  PolicyNode,
  PolicyTest,
  PolicyTestCase,
  PolicyTestOutcome,
  TestEndpoint,
} from './types.js';

/**
 * Runs the policy's `tests` against the compiled rules for these nodes, as TCP. A tag stands for every
 * node that carries it, and the expectation must hold for each of them.
 */
export function runPolicyTests(policy: Policy, nodes: PolicyNode[]): PolicyTestOutcome[] {
  const rules = new RuleSet(policy, new NodeSet(nodes));
  return policy.tests.flatMap((test) => {
    const sources = resolve(rules.nodes, test.endpoint, test.src);
    return test.cases.map((c) => judge(rules, test, sources, c));
  });
}

interface Named {
  label: string;
  endpoint: Endpoint;
}

function judge(
  rules: RuleSet,
  test: PolicyTest,
  sources: Named[] | string,
  c: PolicyTestCase,
): PolicyTestOutcome {
  const want = c.wantAccept ? 'accept' : 'deny';
  const outcome = (passed: boolean, detail: string): PolicyTestOutcome => ({
    src: test.src,
    dst: c.dst,
    wantAccept: c.wantAccept,
    passed,
    message: `${want} ${c.dst} from ${test.src}: ${detail}`,
  });
  const targets = resolve(rules.nodes, c.endpoint, c.dst);
  if (typeof sources === 'string') return outcome(false, sources);
  if (typeof targets === 'string') return outcome(false, targets);
  const pairs = sources.flatMap((s) =>
    targets
      .filter((d) => s.endpoint.index === undefined || s.endpoint.index !== d.endpoint.index)
      .map((d) => [s, d] as const),
  );
  if (pairs.length === 0) return outcome(false, 'source and destination are the same node');
  const byTag = test.endpoint.kind === 'tag' || c.endpoint.kind === 'tag';
  for (const [s, d] of pairs) {
    const accepted = rules.allows(s.endpoint, d.endpoint, c.port, 'tcp');
    if (accepted !== c.wantAccept) {
      const which = byTag ? ` (${s.label} to ${d.label})` : '';
      return outcome(false, `expected ${want}, got ${accepted ? 'accept' : 'deny'}${which}`);
    }
  }
  return outcome(true, 'ok');
}

/** The endpoints a test names, or why there are none. */
function resolve(nodes: NodeSet, endpoint: TestEndpoint, raw: string): Named[] | string {
  const named = (indexes: readonly number[]) =>
    indexes.map((index) => {
      const { node, addresses } = nodes.at(index);
      return { label: node.name, endpoint: { index, addresses } };
    });
  switch (endpoint.kind) {
    case 'node': {
      const found = nodes.named(endpoint.name);
      return found.length > 0 ? named(found) : `unknown node ${quote(endpoint.name)}`;
    }
    case 'tag': {
      const found = nodes.tagged(endpoint.tag);
      return found.length > 0 ? named(found) : `no node has ${endpoint.tag}`;
    }
    case 'address': {
      // An address of a node counts as that node, so that rules naming the node apply to it.
      const index = nodes.withAddress(endpoint.address);
      return [{ label: raw, endpoint: { index, addresses: [endpoint.address] } }];
    }
  }
}
