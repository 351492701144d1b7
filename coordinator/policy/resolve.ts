import { formatPrefix, hasHostBits, isHostPrefix, masked, type Prefix, parsePrefix } from './cidr.js';
import { type JsonPath, PolicyProblem } from './errors.js';
import { isLabel, LABEL_RULE, parsePorts, parseTestPort, quote, splitDestination } from './grammar.js';
import type { PolicyDocument } from './schema.js';
import type {
  AclDestination,
  AclRule,
  DstSelector,
  NodeSelector,
  PolicyTest,
  TestEndpoint,
} from './types.js';

/**
 * How many selectors resolving may produce in all, counted where groups and rules are expanded. A policy
 * is at most 1 MiB, but groups that name groups multiply: this keeps a small policy from taking the
 * coordinator's time and memory.
 */
export const SELECTOR_BUDGET = 1_000_000;

/** How many rule selectors the policy's tests may look at in all: each test case looks at every one. */
export const TEST_BUDGET = 2_000_000;

/**
 * Checks every name, selector, port and address of a document that has the right shape, and resolves
 * groups and hosts so that compiling never looks names up again. Throws PolicyProblem at the first error.
 */
export function resolvePolicy(
  doc: PolicyDocument,
  { testBudget }: { testBudget: number },
): { acls: AclRule[]; tests: PolicyTest[] } {
  const names = new Names(doc);
  const acls = (doc.acls ?? []).map((acl, i) => resolveAcl(names, acl, ['acls', i]));
  const perCase = acls.reduce((sum, acl) => sum + acl.src.length + acl.dst.length, 0);
  let cost = 0;
  const tests = (doc.tests ?? []).map((test, i) => {
    const resolved = resolveTest(names, test, ['tests', i]);
    cost += resolved.cases.length * perCase;
    if (cost > testBudget) {
      throw new PolicyProblem(
        ['tests', i],
        `the tests would look at more than ${testBudget} rule selectors; write fewer tests or narrower rules`,
      );
    }
    return resolved;
  });
  return { acls, tests };
}

type Acl = NonNullable<PolicyDocument['acls']>[number];
type Test = NonNullable<PolicyDocument['tests']>[number];

function resolveAcl(names: Names, acl: Acl, path: JsonPath): AclRule {
  const src = acl.src.flatMap((raw, j) => names.spend(names.select(raw, [...path, 'src', j], 'src'), path));
  const dst = acl.dst.flatMap((raw, j): AclDestination[] => {
    const at = [...path, 'dst', j];
    const { selector, ports: portText } = splitDestination(raw, at);
    const ports = parsePorts(portText, at);
    if (acl.proto === 'icmp' && ports.length > 0) {
      throw new PolicyProblem(at, `icmp has no ports: write ${quote(`${raw.slice(0, -portText.length)}*`)}`);
    }
    return names.spend(names.select(selector, at, 'dst'), path).map((s) => ({ selector: s, ports }));
  });
  return { src, dst, protocols: acl.proto ? [acl.proto] : [] };
}

function resolveTest(names: Names, test: Test, path: JsonPath): PolicyTest {
  const endpoint = names.endpoint(test.src, [...path, 'src']);
  const cases = (['accept', 'deny'] as const).flatMap((kind) =>
    (test[kind] ?? []).map((raw, j) => {
      const at = [...path, kind, j];
      const { selector, ports } = splitDestination(raw, at);
      return {
        dst: raw,
        endpoint: names.endpoint(selector, at),
        port: parseTestPort(ports, at),
        wantAccept: kind === 'accept',
      };
    }),
  );
  if (cases.length === 0) throw new PolicyProblem(path, 'a test needs "accept" or "deny" entries');
  return { src: test.src, endpoint, cases };
}

/** The names a policy declares: tags, hosts and groups. */
class Names {
  private readonly tags = new Set<string>();
  private readonly hosts = new Map<string, Prefix>();
  private readonly groups = new Map<string, string[]>();
  private readonly expanded = new Map<string, NodeSelector[]>();
  /** Groups being expanded, outermost first, to report a cycle by its members. */
  private readonly expanding: string[] = [];
  private spent = 0;

  constructor(doc: PolicyDocument) {
    for (const tag of Object.keys(doc.tagOwners ?? {})) {
      if (!tag.startsWith('tag:') || !isLabel(tag.slice(4))) {
        throw new PolicyProblem(['tagOwners', tag], `a tag is "tag:" and ${LABEL_RULE}`, 'key');
      }
      this.tags.add(tag);
    }
    for (const [name, value] of Object.entries(doc.hosts ?? {})) {
      if (!isLabel(name)) throw new PolicyProblem(['hosts', name], `a host name is ${LABEL_RULE}`, 'key');
      const prefix = network(value, ['hosts', name]);
      if (!prefix) throw new PolicyProblem(['hosts', name], `${quote(value)} is not an IP address or CIDR`);
      this.hosts.set(name, prefix);
    }
    for (const [name, members] of Object.entries(doc.groups ?? {})) {
      if (!name.startsWith('group:') || !isLabel(name.slice(6))) {
        throw new PolicyProblem(['groups', name], `a group is "group:" and ${LABEL_RULE}`, 'key');
      }
      this.groups.set(name, members);
    }
    for (const name of this.groups.keys()) this.group(name, ['groups', name]);
    for (const [tag, owners] of Object.entries(doc.tagOwners ?? {})) {
      owners.forEach((owner, i) => {
        const at = ['tagOwners', tag, i];
        if (owner.startsWith('group:') && !this.groups.has(owner)) throw unknownGroup(owner, at);
        if (owner.startsWith('tag:')) this.tag(owner, at);
      });
    }
  }

  select(raw: string, path: JsonPath, place: 'dst'): DstSelector[];
  select(raw: string, path: JsonPath, place: 'src' | 'group'): NodeSelector[];
  select(raw: string, path: JsonPath, place: 'src' | 'dst' | 'group'): DstSelector[] {
    if (raw === '*') return [{ kind: 'all' }];
    if (raw.startsWith('tag:')) return [{ kind: 'tag', tag: this.tag(raw, path) }];
    if (raw.startsWith('group:')) return this.group(raw, path);
    if (raw === 'autogroup:member') return [{ kind: 'member' }];
    if (raw === 'autogroup:self') {
      if (place !== 'dst') throw new PolicyProblem(path, 'autogroup:self is only valid in dst');
      return [{ kind: 'self' }];
    }
    if (raw.startsWith('autogroup:')) {
      throw new PolicyProblem(
        path,
        `unknown autogroup ${quote(raw)} (known: autogroup:member, autogroup:self)`,
      );
    }
    const prefix = this.hosts.get(raw) ?? network(raw, path);
    if (prefix) return [{ kind: 'prefix', prefix }];
    if (isLabel(raw)) return [{ kind: 'node', name: raw }];
    throw unknownName(raw, path);
  }

  endpoint(raw: string, path: JsonPath): TestEndpoint {
    if (raw.startsWith('tag:')) return { kind: 'tag', tag: this.tag(raw, path) };
    if (raw === '*' || raw.startsWith('group:') || raw.startsWith('autogroup:')) {
      throw new PolicyProblem(path, `a test names a node, tag, host or IP address, not ${quote(raw)}`);
    }
    const prefix = this.hosts.get(raw) ?? network(raw, path);
    if (prefix) {
      if (!isHostPrefix(prefix))
        throw new PolicyProblem(path, `${quote(raw)} is a network; a test needs one address`);
      return { kind: 'address', address: { family: prefix.family, bytes: prefix.bytes } };
    }
    if (isLabel(raw)) return { kind: 'node', name: raw };
    throw unknownName(raw, path);
  }

  /** Counts `selectors` against the budget; returns them. */
  spend<T>(selectors: T[], path: JsonPath): T[] {
    this.spent += selectors.length;
    if (this.spent > SELECTOR_BUDGET) {
      throw new PolicyProblem(
        path,
        `the policy expands to more than ${SELECTOR_BUDGET} selectors; name each group once where it is used`,
      );
    }
    return selectors;
  }

  private tag(raw: string, path: JsonPath): string {
    if (!this.tags.has(raw)) throw new PolicyProblem(path, `unknown tag ${quote(raw)} (not in tagOwners)`);
    return raw;
  }

  private group(name: string, path: JsonPath): NodeSelector[] {
    const done = this.expanded.get(name);
    if (done) return done;
    const members = this.groups.get(name);
    if (!members) throw unknownGroup(name, path);
    const cycleStart = this.expanding.indexOf(name);
    if (cycleStart >= 0) {
      const cycle = [...this.expanding.slice(cycleStart), name].join(' -> ');
      throw new PolicyProblem(path, `groups include each other: ${cycle}`);
    }
    this.expanding.push(name);
    // Each group is expanded once (memoized) and holds every selector once, so a group that names
    // another ten times is no larger than the other.
    const unique = new Map<string, NodeSelector>();
    members.forEach((member, i) => {
      const at = ['groups', name, i];
      for (const s of this.spend(this.select(member, at, 'group'), at)) unique.set(selectorKey(s), s);
    });
    this.expanding.pop();
    const selectors = [...unique.values()];
    this.expanded.set(name, selectors);
    return selectors;
  }
}

/** Parses an IP or CIDR; undefined when `raw` does not look like one, a problem when it looks wrong. */
function network(raw: string, path: JsonPath): Prefix | undefined {
  const prefix = parsePrefix(raw);
  if (!prefix) {
    if (raw.includes('/') || raw.includes(':') || /^[\d.]+$/.test(raw)) {
      throw new PolicyProblem(path, `${quote(raw)} is not a valid IP address or CIDR`);
    }
    return undefined;
  }
  if (hasHostBits(prefix)) {
    const network = formatPrefix(masked(prefix));
    throw new PolicyProblem(path, `${quote(raw)} has host bits set; did you mean ${quote(network)}?`);
  }
  return prefix;
}

function selectorKey(s: NodeSelector): string {
  switch (s.kind) {
    case 'node':
      return `node ${s.name}`;
    case 'tag':
      return `tag ${s.tag}`;
    case 'prefix':
      return `prefix ${formatPrefix(s.prefix)}`;
    default:
      return s.kind;
  }
}

function unknownGroup(name: string, path: JsonPath): PolicyProblem {
  return new PolicyProblem(path, `unknown group ${quote(name)} (not in groups)`);
}

function unknownName(raw: string, path: JsonPath): PolicyProblem {
  return new PolicyProblem(
    path,
    `unknown host ${quote(raw)}: not in hosts, and not a node name (${LABEL_RULE}), tag, group, IP or CIDR`,
  );
}
