import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  compilePolicy,
  type FilterRuleSpec,
  PolicyError,
  type PolicyNode,
  parsePolicy,
  runPolicyTests,
} from '../../coordinator/policy/index.js';

function node(
  id: number,
  name: string,
  tags: string[] = [],
  owner = `key-${id}`,
  routes?: string[],
): PolicyNode {
  return {
    id: `n${id}`,
    name,
    ips: [`100.64.0.${id}`, `fd7a:115c:a1e0::${id}`],
    tags,
    owner,
    ...(routes ? { routes } : {}),
  };
}

function parseError(text: string): PolicyError {
  try {
    parsePolicy(text);
  } catch (error) {
    assert.ok(error instanceof PolicyError, `expected a PolicyError, got ${String(error)}`);
    return error;
  }
  assert.fail('the policy was accepted');
}

function sorted(ids: string[]): string[] {
  return [...ids].sort();
}

const ops = node(1, 'ops', ['tag:ops']);
const firewall = node(2, 'firewall', ['tag:firewall']);
const machine = node(3, 'machine');
const fleet = [ops, firewall, machine];

const tagPolicy = `{
  "tagOwners": { "tag:ops": [], "tag:firewall": [] },
  "acls": [{ "action": "accept", "src": ["tag:ops"], "dst": ["tag:firewall:22"] }],
}`;

describe('parsePolicy', () => {
  it('accepts comments and trailing commas and keeps the source', () => {
    const text = `// the production mesh
{
  /* operators
     and their laptops */
  "tagOwners": {
    "tag:ops": ["https://example.com/owners", ], // a "//" inside a string is no comment
  },
  "acls": [
    { "action": "accept", "src": ["tag:ops",], "dst": ["*:22",], },
  ],
}
`;
    const policy = parsePolicy(text);
    assert.equal(policy.source, text);
    assert.deepEqual(policy.document.tagOwners, { 'tag:ops': ['https://example.com/owners'] });
    assert.equal(policy.acls.length, 1);
    assert.deepEqual(parsePolicy('\uFEFF{}').acls, []);
  });

  it('reports a syntax error at its line and column', () => {
    const error = parseError('{\n  "hosts": {\n    "db": "10.0.0.5"\n    "web": "10.0.0.6"\n  }\n}');
    assert.equal(error.line, 4);
    assert.equal(error.column, 5);
    assert.equal(error.path, '');
    assert.match(error.message, /^policy:4:5: syntax error: /);
  });

  it('finds the place of a syntax error that JSON.parse gives no position for', () => {
    const error = parseError('{\n  // comment\n  "acls": [ tru ]\n}');
    assert.equal(error.message, 'policy:3:13: syntax error: expected a value');
  });

  it('reports an unterminated block comment where it starts', () => {
    const error = parseError('{\n  "acls": [] /* no end\n}');
    assert.equal(error.message, 'policy:2:14: syntax error: unterminated /* comment');
  });

  it('reports an unknown tag at the selector that uses it', () => {
    const text = `{
  "tagOwners": { "tag:firewall": [] },
  "acls": [
    { "action": "accept", "src": ["*"], "dst": ["tag:firewall:22"] },
    { "action": "accept", "src": ["*"], "dst": ["tag:firewall:80", "tag:fw:22"] },
  ],
}`;
    const error = parseError(text);
    assert.equal(error.message, 'policy:5:68: acls[1].dst[1]: unknown tag "tag:fw" (not in tagOwners)');
    assert.equal(error.line, 5);
    assert.equal(error.column, 68);
    assert.equal(error.path, 'acls[1].dst[1]');
  });

  it('reports an unknown group, also inside another group', () => {
    const inAcl = parseError(
      '{\n  "acls": [{ "action": "accept", "src": ["group:admins"], "dst": ["*:*"] }]\n}',
    );
    assert.equal(inAcl.message, 'policy:2:42: acls[0].src[0]: unknown group "group:admins" (not in groups)');
    const inGroup = parseError('{\n  "groups": {\n    "group:ops": ["alice", "group:nobody"],\n  },\n}');
    assert.equal(
      inGroup.message,
      'policy:3:28: groups["group:ops"][1]: unknown group "group:nobody" (not in groups)',
    );
  });

  it('reports a group cycle', () => {
    const error = parseError(
      '{\n  "groups": {\n    "group:a": ["group:b"],\n    "group:b": ["group:a"]\n  }\n}',
    );
    assert.equal(error.line, 4);
    assert.match(error.message, /group:a -> group:b -> group:a/);
  });

  it('reports an unknown host, a bad port and a bad CIDR at their place', () => {
    const host = parseError(
      '{\n  "acls": [{ "action": "accept", "src": ["db.internal"], "dst": ["*:*"] }]\n}',
    );
    assert.equal(host.line, 2);
    assert.equal(host.column, 42);
    assert.match(host.message, /acls\[0\]\.src\[0\]: unknown host "db\.internal"/);

    const port = parseError(
      '{\n  "acls": [{\n    "action": "accept",\n    "src": ["*"],\n    "dst": ["web:22", "web:80-70"],\n  }],\n}',
    );
    assert.equal(port.line, 5);
    assert.equal(port.column, 23);
    assert.match(port.message, /acls\[0\]\.dst\[1\]: bad port "80-70"/);

    const high = parseError('{"acls": [{"action": "accept", "src": ["*"], "dst": ["web:65536"]}]}');
    assert.match(high.message, /^policy:1:54: acls\[0\]\.dst\[0\]: bad port "65536"/);

    const cidr = parseError('{\n  "hosts": {\n    "dc": "10.0.0.1/8",\n  },\n}');
    assert.equal(
      cidr.message,
      'policy:3:11: hosts.dc: "10.0.0.1/8" has host bits set; did you mean "10.0.0.0/8"?',
    );
  });

  it('points an unknown key at the key, and names the keys there are', () => {
    const error = parseError('{\n  "acls": [{ "action": "accept", "source": ["*"], "dst": ["*:*"] }]\n}');
    assert.equal(error.line, 2);
    assert.equal(error.column, 34);
    assert.match(
      error.message,
      /acls\[0\]\.source: unknown key "source" \(allowed: action, src, dst, proto\)/,
    );
    assert.match(parseError('{ "group": {} }').message, /^policy:1:3: group: unknown key "group"/);
  });

  it('rejects other actions, bare IPv6 destinations, autogroup:self as a source and duplicate keys', () => {
    assert.match(
      parseError('{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}').message,
      /only action is "accept"/,
    );
    assert.match(
      parseError('{"acls": [{"action": "accept", "src": ["*"], "dst": ["fd00::1:22"]}]}').message,
      /IPv6 destinations go in brackets/,
    );
    assert.match(
      parseError('{"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]}').message,
      /autogroup:self is only valid in dst/,
    );
    assert.match(
      parseError('{"hosts": {"db": "10.0.0.1"},\n "hosts": {}}').message,
      /^policy:2:2: hosts: duplicate key/,
    );
  });
});

describe('compilePolicy without a policy', () => {
  const open = compilePolicy(null, fleet);

  it('lets every node see every other one', () => {
    assert.equal(open.allowAll, true);
    assert.equal(open.canSee('n1', 'n3'), true);
    assert.equal(open.canSee('n1', 'n1'), false);
    assert.equal(open.canSee('n1', 'unknown'), false);
    assert.deepEqual(open.visiblePeers('n2'), ['n1', 'n3']);
    assert.deepEqual(open.visiblePeers('nobody'), []);
  });

  it('gives every node a filter that accepts everything', () => {
    assert.deepEqual(open.filterFor('n3'), [
      { srcCidrs: ['0.0.0.0/0', '::/0'], dstCidrs: [], ports: [], protocols: [] },
    ]);
    assert.deepEqual(open.filterFor('nobody'), []);
  });
});

describe('compilePolicy with a tag rule', () => {
  const compiled = compilePolicy(parsePolicy(tagPolicy), fleet);

  it('makes ops and firewall see each other, and nobody see the machine', () => {
    assert.equal(compiled.allowAll, false);
    assert.equal(compiled.canSee('n1', 'n2'), true);
    assert.equal(compiled.canSee('n2', 'n1'), true);
    assert.equal(compiled.canSee('n3', 'n1'), false);
    assert.deepEqual(compiled.visiblePeers('n1'), ['n2']);
    assert.deepEqual(compiled.visiblePeers('n2'), ['n1']);
    assert.deepEqual(compiled.visiblePeers('n3'), []);
  });

  it('opens port 22 on the firewall for the addresses of ops, and nothing elsewhere', () => {
    assert.deepEqual(compiled.filterFor('n2'), [
      {
        srcCidrs: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'],
        dstCidrs: ['100.64.0.2/32', 'fd7a:115c:a1e0::2/128'],
        ports: [{ first: 22, last: 22 }],
        protocols: [],
      },
    ]);
    assert.deepEqual(compiled.filterFor('n1'), []);
    assert.deepEqual(compiled.filterFor('n3'), []);
  });

  it('shares frozen filter arrays, so one caller cannot change another node’s filter', () => {
    const [spec] = compiled.filterFor('n2') as [FilterRuleSpec];
    assert.throws(() => spec.srcCidrs.push('0.0.0.0/0'), TypeError);
  });
});

describe('compilePolicy selectors', () => {
  it('expands groups of node names, tags and other groups, and merges ports of one source set', () => {
    const policy = parsePolicy(`{
      "tagOwners": { "tag:ops": [] },
      "groups": {
        "group:admins": ["machine", "group:oncall"],
        "group:oncall": ["tag:ops"],
      },
      "acls": [
        { "action": "accept", "src": ["group:admins"], "dst": ["firewall:22"] },
        { "action": "accept", "src": ["group:admins"], "dst": ["firewall:443,80"], "proto": "tcp" },
        { "action": "accept", "src": ["group:admins"], "dst": ["firewall:8000-8080", "firewall:8081"], "proto": "tcp" },
      ],
    }`);
    const compiled = compilePolicy(policy, fleet);
    assert.deepEqual(sorted(compiled.visiblePeers('n2')), ['n1', 'n3']);
    assert.equal(compiled.canSee('n1', 'n3'), false);
    const src = ['100.64.0.1/32', '100.64.0.3/32', 'fd7a:115c:a1e0::1/128', 'fd7a:115c:a1e0::3/128'];
    const dst = ['100.64.0.2/32', 'fd7a:115c:a1e0::2/128'];
    assert.deepEqual(compiled.filterFor('n2'), [
      { srcCidrs: src, dstCidrs: dst, ports: [{ first: 22, last: 22 }], protocols: [] },
      {
        srcCidrs: src,
        dstCidrs: dst,
        ports: [
          { first: 80, last: 80 },
          { first: 443, last: 443 },
          { first: 8000, last: 8081 },
        ],
        protocols: ['tcp'],
      },
    ]);
  });

  it('uses hosts and CIDR sources, and makes nodes inside a source CIDR visible', () => {
    const policy = parsePolicy(`{
      "hosts": { "jump": "100.64.0.1", "office": "192.168.0.0/16" },
      "acls": [{ "action": "accept", "src": ["jump", "office", "fd00:1::/64"], "dst": ["machine:22"] }],
    }`);
    const compiled = compilePolicy(policy, fleet);
    assert.deepEqual(compiled.filterFor('n3'), [
      {
        srcCidrs: ['100.64.0.1/32', '192.168.0.0/16', 'fd00:1::/64'],
        dstCidrs: ['100.64.0.3/32', 'fd7a:115c:a1e0::3/128'],
        ports: [{ first: 22, last: 22 }],
        protocols: [],
      },
    ]);
    assert.equal(compiled.canSee('n1', 'n3'), true);
    assert.equal(compiled.canSee('n2', 'n3'), false);
  });

  it('matches prefixes that end inside a byte and writes addresses in canonical form', () => {
    const outside = { ...node(9, 'outside'), ips: ['100.128.0.9'] };
    const policy = parsePolicy(`{
      "acls": [{ "action": "accept", "src": ["100.64.0.0/10", "FD7A:115C:A1E0:0:0:0:0:0/48"], "dst": ["machine:22"] }],
    }`);
    const compiled = compilePolicy(policy, [...fleet, outside]);
    assert.deepEqual(compiled.filterFor('n3')[0]?.srcCidrs, ['100.64.0.0/10', 'fd7a:115c:a1e0::/48']);
    assert.deepEqual(sorted(compiled.visiblePeers('n3')), ['n1', 'n2']);
  });

  it('opens a routed subnet on its router and makes the router visible to the sources', () => {
    const router = node(4, 'router', [], 'key-4', ['10.1.0.0/16']);
    const policy = parsePolicy(`{
      "tagOwners": { "tag:ops": [] },
      "acls": [{ "action": "accept", "src": ["tag:ops"], "dst": ["10.0.0.0/8:22", "[fd7a:115c:a1e0::3]:80"] }],
    }`);
    const compiled = compilePolicy(policy, [...fleet, router]);
    const src = ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'];
    assert.deepEqual(compiled.filterFor('n4'), [
      { srcCidrs: src, dstCidrs: ['10.1.0.0/16'], ports: [{ first: 22, last: 22 }], protocols: [] },
    ]);
    assert.deepEqual(compiled.filterFor('n3'), [
      { srcCidrs: src, dstCidrs: ['fd7a:115c:a1e0::3/128'], ports: [{ first: 80, last: 80 }], protocols: [] },
    ]);
    assert.deepEqual(sorted(compiled.visiblePeers('n1')), ['n3', 'n4']);
    assert.equal(compiled.canSee('n2', 'n4'), false);
  });

  it('picks untagged nodes with autogroup:member', () => {
    const laptop = node(4, 'laptop');
    const policy = parsePolicy(`{
      "acls": [{ "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:22"] }],
    }`);
    const compiled = compilePolicy(policy, [...fleet, laptop]);
    assert.deepEqual(compiled.visiblePeers('n3'), ['n4']);
    assert.deepEqual(compiled.visiblePeers('n1'), []);
    assert.deepEqual(compiled.filterFor('n4')[0]?.srcCidrs, [
      '100.64.0.3/32',
      '100.64.0.4/32',
      'fd7a:115c:a1e0::3/128',
      'fd7a:115c:a1e0::4/128',
    ]);
    assert.deepEqual(compiled.filterFor('n2'), []);
  });

  it('pairs nodes of one owner with autogroup:self, never a node with itself', () => {
    const nodes = [node(1, 'a1', [], 'key-a'), node(2, 'a2', [], 'key-a'), node(3, 'b1', [], 'key-b')];
    const policy = parsePolicy(
      `{ "acls": [{ "action": "accept", "src": ["*"], "dst": ["autogroup:self:22"] }] }`,
    );
    const compiled = compilePolicy(policy, nodes);
    assert.equal(compiled.canSee('n1', 'n2'), true);
    assert.equal(compiled.canSee('n1', 'n3'), false);
    assert.deepEqual(compiled.visiblePeers('n1'), ['n2']);
    assert.deepEqual(compiled.visiblePeers('n3'), []);
    assert.deepEqual(compiled.filterFor('n1'), [
      {
        srcCidrs: ['100.64.0.2/32', 'fd7a:115c:a1e0::2/128'],
        dstCidrs: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'],
        ports: [{ first: 22, last: 22 }],
        protocols: [],
      },
    ]);
    assert.deepEqual(compiled.filterFor('n3'), []);
  });

  it('uses 0.0.0.0/0 and ::/0 for a wildcard source and opens routes for a wildcard destination', () => {
    const router = node(4, 'router', [], 'key-4', ['10.1.0.0/16']);
    const compiled = compilePolicy(
      parsePolicy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": "icmp"}]}'),
      [ops, router],
    );
    assert.deepEqual(compiled.filterFor('n4'), [
      {
        srcCidrs: ['0.0.0.0/0', '::/0'],
        dstCidrs: ['100.64.0.4/32', 'fd7a:115c:a1e0::4/128', '10.1.0.0/16'],
        ports: [],
        protocols: ['icmp'],
      },
    ]);
    assert.deepEqual(compiled.visiblePeers('n1'), ['n4']);
  });
});

describe('compilePolicy: what each rule opens, and to whom', () => {
  const router = node(4, 'router', [], 'key-4', ['10.1.0.0/16']);
  const ports22 = [{ first: 22, last: 22 }];
  const machineCidrs = ['100.64.0.3/32', 'fd7a:115c:a1e0::3/128'];

  it('keeps rules with different sources apart, even when their CIDR lists run together as text', () => {
    // "0.0.0.0/1" + "28.0.0.0/8" and "0.0.0.0/12" + "8.0.0.0/8" are the same characters.
    const compiled = compilePolicy(
      parsePolicy(`{ "acls": [
        { "action": "accept", "src": ["0.0.0.0/1", "28.0.0.0/8"], "dst": ["machine:22"] },
        { "action": "accept", "src": ["0.0.0.0/12", "8.0.0.0/8"], "dst": ["machine:22"] },
      ] }`),
      fleet,
    );
    assert.deepEqual(compiled.filterFor('n3'), [
      { srcCidrs: ['0.0.0.0/1', '28.0.0.0/8'], dstCidrs: machineCidrs, ports: ports22, protocols: [] },
      { srcCidrs: ['0.0.0.0/12', '8.0.0.0/8'], dstCidrs: machineCidrs, ports: ports22, protocols: [] },
    ]);
  });

  it('opens no port on a rule that also allows every port, in either order', () => {
    for (const dst of [
      ['machine:*', 'machine:22'],
      ['machine:22', 'machine:*'],
    ]) {
      const compiled = compilePolicy(
        parsePolicy(`{ "tagOwners": { "tag:ops": [] }, "acls": [
          { "action": "accept", "src": ["tag:ops"], "dst": ["${dst[0]}"] },
          { "action": "accept", "src": ["tag:ops"], "dst": ["${dst[1]}"] },
        ] }`),
        fleet,
      );
      assert.deepEqual(compiled.filterFor('n3'), [
        {
          srcCidrs: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'],
          dstCidrs: machineCidrs,
          ports: [],
          protocols: [],
        },
      ]);
    }
  });

  it('uses 0.0.0.0/0 and ::/0 when `*` is one source among others', () => {
    const compiled = compilePolicy(
      parsePolicy(`{ "tagOwners": { "tag:ops": [] }, "acls": [
        { "action": "accept", "src": ["tag:ops", "*"], "dst": ["machine:22"] },
      ] }`),
      fleet,
    );
    assert.deepEqual(compiled.filterFor('n3')[0]?.srcCidrs, ['0.0.0.0/0', '::/0']);
  });

  it('opens nothing for a rule whose source matches no node and no address', () => {
    const compiled = compilePolicy(
      parsePolicy(`{ "tagOwners": { "tag:ghost": [] }, "acls": [
        { "action": "accept", "src": ["tag:ghost"], "dst": ["machine:22"] },
      ] }`),
      fleet,
    );
    assert.deepEqual(compiled.filterFor('n3'), []);
    assert.deepEqual(compiled.visiblePeers('n3'), []);
  });

  it('opens only the addresses of a router named as destination, not its routes', () => {
    const compiled = compilePolicy(
      parsePolicy(`{ "tagOwners": { "tag:ops": [] }, "acls": [
        { "action": "accept", "src": ["tag:ops"], "dst": ["router:22"] },
      ] }`),
      [...fleet, router],
    );
    assert.deepEqual(compiled.filterFor('n4'), [
      {
        srcCidrs: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'],
        dstCidrs: ['100.64.0.4/32', 'fd7a:115c:a1e0::4/128'],
        ports: ports22,
        protocols: [],
      },
    ]);
  });

  it('makes a router visible to the destinations when its routes overlap a source CIDR', () => {
    const compiled = compilePolicy(
      parsePolicy('{ "acls": [{ "action": "accept", "src": ["10.0.0.0/8"], "dst": ["machine:22"] }] }'),
      [...fleet, router],
    );
    assert.equal(compiled.canSee('n4', 'n3'), true);
    assert.deepEqual(compiled.visiblePeers('n3'), ['n4']);
    assert.equal(compiled.canSee('n1', 'n3'), false);
  });

  it('does not pair nodes of one owner unless a rule says autogroup:self', () => {
    const shared = [ops, firewall, { ...machine, owner: ops.owner }];
    const compiled = compilePolicy(parsePolicy(tagPolicy), shared);
    assert.deepEqual(compiled.visiblePeers('n1'), ['n2']);
    assert.equal(compiled.canSee('n1', 'n3'), false);
    assert.equal(compiled.canSee('n3', 'n1'), false);
    assert.deepEqual(compiled.visiblePeers('n3'), []);
  });

  describe('autogroup:self with one source among an owner’s nodes', () => {
    // a1 is the only source; a2 and a3 share its owner, b1 is another owner's node with the same tag.
    const a1 = node(1, 'a1', ['tag:ops'], 'key-a');
    const a2 = node(2, 'a2', [], 'key-a');
    const a3 = node(3, 'a3', [], 'key-a');
    const b1 = node(4, 'b1', ['tag:ops'], 'key-b');
    const nodes = [a1, a2, a3, b1];
    const policy = parsePolicy(`{
      "tagOwners": { "tag:ops": [] },
      "acls": [{ "action": "accept", "src": ["a1"], "dst": ["autogroup:self:22"] }],
      "tests": [
        { "src": "a1", "accept": ["a2:22", "a3:22"], "deny": ["a2:80", "b1:22", "10.9.9.9:22"] },
        { "src": "a2", "deny": ["a1:22", "a3:22"] },
      ],
    }`);
    const compiled = compilePolicy(policy, nodes);

    it('pairs the source with the other nodes of its owner, both ways, and nobody else', () => {
      assert.equal(compiled.canSee('n1', 'n2'), true);
      assert.equal(compiled.canSee('n2', 'n1'), true);
      assert.equal(compiled.canSee('n2', 'n3'), false);
      assert.equal(compiled.canSee('n1', 'n4'), false);
      assert.equal(compiled.canSee('n1', 'n1'), false);
      assert.deepEqual(sorted(compiled.visiblePeers('n1')), ['n2', 'n3']);
      assert.deepEqual(compiled.visiblePeers('n2'), ['n1']);
      assert.deepEqual(compiled.visiblePeers('n4'), []);
    });

    it('opens the port on the other nodes for the source only, and nothing on the source', () => {
      assert.deepEqual(compiled.filterFor('n2'), [
        {
          srcCidrs: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'],
          dstCidrs: ['100.64.0.2/32', 'fd7a:115c:a1e0::2/128'],
          ports: ports22,
          protocols: [],
        },
      ]);
      assert.deepEqual(compiled.filterFor('n1'), []);
      assert.deepEqual(compiled.filterFor('n4'), []);
    });

    it('answers for node ids it does not know with nothing', () => {
      assert.equal(compiled.canSee('n1', 'nobody'), false);
      assert.equal(compiled.canSee('nobody', 'n1'), false);
      assert.deepEqual(compiled.visiblePeers('nobody'), []);
      assert.deepEqual(compiled.filterFor('nobody'), []);
    });

    it('lets policy tests judge what autogroup:self opens, as the filters do', () => {
      assert.deepEqual(
        runPolicyTests(policy, nodes).map((o) => [o.passed, o.message]),
        [
          [true, 'accept a2:22 from a1: ok'],
          [true, 'accept a3:22 from a1: ok'],
          [true, 'deny a2:80 from a1: ok'],
          [true, 'deny b1:22 from a1: ok'],
          [true, 'deny 10.9.9.9:22 from a1: ok'],
          [true, 'deny a1:22 from a2: ok'],
          [true, 'deny a3:22 from a2: ok'],
        ],
      );
    });

    it('keeps autogroup:self rules with different sources apart', () => {
      const two = compilePolicy(
        parsePolicy(`{ "acls": [
          { "action": "accept", "src": ["a1"], "dst": ["autogroup:self:22"] },
          { "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:80"] },
        ] }`),
        nodes,
      );
      assert.deepEqual(two.filterFor('n2'), [
        {
          srcCidrs: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'],
          dstCidrs: ['100.64.0.2/32', 'fd7a:115c:a1e0::2/128'],
          ports: ports22,
          protocols: [],
        },
        {
          srcCidrs: ['100.64.0.3/32', 'fd7a:115c:a1e0::3/128'],
          dstCidrs: ['100.64.0.2/32', 'fd7a:115c:a1e0::2/128'],
          ports: [{ first: 80, last: 80 }],
          protocols: [],
        },
      ]);
    });
  });
});

describe('runPolicyTests', () => {
  const policy = parsePolicy(`{
    "tagOwners": { "tag:ops": [], "tag:firewall": [] },
    "hosts": { "office": "192.168.1.10" },
    "acls": [
      { "action": "accept", "src": ["tag:ops", "office"], "dst": ["tag:firewall:22"] },
      { "action": "accept", "src": ["tag:ops"], "dst": ["firewall:443", "10.0.0.0/8:22"] },
    ],
    "tests": [
      { "src": "ops", "accept": ["firewall:22", "firewall:443"], "deny": ["firewall:80", "machine:22"] },
      { "src": "office", "accept": ["firewall:22"], "deny": ["firewall:443"] },
      { "src": "tag:ops", "accept": ["10.9.9.9:22", "machine:22"] },
      { "src": "machine", "accept": ["firewall:22"] },
      { "src": "nobody", "deny": ["firewall:22"] },
    ],
  }`);

  it('reports which expectations hold and which do not', () => {
    const outcomes = runPolicyTests(policy, fleet);
    assert.deepEqual(
      outcomes.map((o) => [o.src, o.dst, o.wantAccept, o.passed]),
      [
        ['ops', 'firewall:22', true, true],
        ['ops', 'firewall:443', true, true],
        ['ops', 'firewall:80', false, true],
        ['ops', 'machine:22', false, true],
        ['office', 'firewall:22', true, true],
        ['office', 'firewall:443', false, true],
        ['tag:ops', '10.9.9.9:22', true, true],
        ['tag:ops', 'machine:22', true, false],
        ['machine', 'firewall:22', true, false],
        ['nobody', 'firewall:22', false, false],
      ],
    );
    assert.equal(outcomes[0]?.message, 'accept firewall:22 from ops: ok');
    assert.equal(
      outcomes[7]?.message,
      'accept machine:22 from tag:ops: expected accept, got deny (ops to machine)',
    );
    assert.equal(outcomes[8]?.message, 'accept firewall:22 from machine: expected accept, got deny');
    assert.equal(outcomes[9]?.message, 'deny firewall:22 from nobody: unknown node "nobody"');
  });

  it('requires an expectation to hold for every node with a tag', () => {
    const second = node(5, 'ops-2', ['tag:ops']);
    const strict = parsePolicy(`{
      "tagOwners": { "tag:ops": [] },
      "acls": [{ "action": "accept", "src": ["ops"], "dst": ["machine:22"] }],
      "tests": [{ "src": "tag:ops", "accept": ["machine:22"] }],
    }`);
    const [outcome] = runPolicyTests(strict, [ops, second, machine]);
    assert.equal(outcome?.passed, false);
    assert.equal(
      outcome?.message,
      'accept machine:22 from tag:ops: expected accept, got deny (ops-2 to machine)',
    );
  });

  it('names what is wrong: an unknown destination, a node tested against itself, the failing pair of tags', () => {
    const second = node(5, 'ops-2', ['tag:ops']);
    const p = parsePolicy(`{
      "tagOwners": { "tag:ops": [] },
      "hosts": { "office": "192.168.1.10" },
      "acls": [{ "action": "accept", "src": ["tag:ops"], "dst": ["tag:ops:22"] }],
      "tests": [
        { "src": "ops", "accept": ["nobody:22", "ops:22", "ops-2:22"], "deny": ["ops-2:80", "tag:ops:22"] },
        { "src": "tag:ops", "accept": ["tag:ops:22"], "deny": ["tag:ops:22"] },
        { "src": "office", "deny": ["10.9.9.9:22"] },
      ],
    }`);
    assert.deepEqual(
      runPolicyTests(p, [ops, second]).map((o) => [o.passed, o.message]),
      [
        [false, 'accept nobody:22 from ops: unknown node "nobody"'],
        [false, 'accept ops:22 from ops: source and destination are the same node'],
        [true, 'accept ops-2:22 from ops: ok'],
        [true, 'deny ops-2:80 from ops: ok'],
        [false, 'deny tag:ops:22 from ops: expected deny, got accept (ops to ops-2)'],
        [true, 'accept tag:ops:22 from tag:ops: ok'],
        [false, 'deny tag:ops:22 from tag:ops: expected deny, got accept (ops to ops-2)'],
        [true, 'deny 10.9.9.9:22 from office: ok'],
      ],
    );
  });

  it('judges tests as TCP, so a rule for another protocol does not make them pass', () => {
    const udpOnly = parsePolicy(`{
      "tagOwners": { "tag:ops": [], "tag:firewall": [] },
      "acls": [
        { "action": "accept", "src": ["tag:ops"], "dst": ["tag:firewall:53"], "proto": "udp" },
        { "action": "accept", "src": ["tag:ops"], "dst": ["tag:firewall:22"], "proto": "tcp" },
      ],
      "tests": [{ "src": "ops", "accept": ["firewall:22", "firewall:53"], "deny": ["firewall:53"] }],
    }`);
    assert.deepEqual(
      runPolicyTests(udpOnly, fleet).map((o) => [o.dst, o.wantAccept, o.passed]),
      [
        ['firewall:22', true, true],
        ['firewall:53', true, false],
        ['firewall:53', false, true],
      ],
    );
  });

  it('fails tests that name a node or tag no node answers to', () => {
    const [outcome] = runPolicyTests(policy, [firewall, machine]);
    assert.equal(outcome?.passed, false);
    assert.equal(outcome?.message, 'accept firewall:22 from ops: unknown node "ops"');
    const tagged = runPolicyTests(policy, [firewall, machine]).find((o) => o.src === 'tag:ops');
    assert.match(tagged?.message ?? '', /no node has tag:ops/);
  });
});

describe('runPolicyTests judging addresses and ports', () => {
  const v4only: PolicyNode = { id: 'n7', name: 'v4only', ips: ['100.64.0.7'], tags: [], owner: 'key-7' };

  it('never lets traffic cross address families, and `*` reaches addresses no node has', () => {
    const policy = parsePolicy(`{
      "acls": [{ "action": "accept", "src": ["*"], "dst": ["*:*"] }],
      "tests": [
        { "src": "v4only", "accept": ["10.9.9.9:22", "machine:22"], "deny": ["[fd00::9]:22"] },
        { "src": "fd00::5", "accept": ["[fd00::9]:22"], "deny": ["10.9.9.9:22"] },
      ],
    }`);
    assert.deepEqual(
      runPolicyTests(policy, [...fleet, v4only]).map((o) => [o.passed, o.message]),
      [
        [true, 'accept 10.9.9.9:22 from v4only: ok'],
        [true, 'accept machine:22 from v4only: ok'],
        [true, 'deny [fd00::9]:22 from v4only: ok'],
        [true, 'accept [fd00::9]:22 from fd00::5: ok'],
        [true, 'deny 10.9.9.9:22 from fd00::5: ok'],
      ],
    );
  });

  it('matches a node inside a source CIDR only by its addresses in that CIDR', () => {
    const policy = parsePolicy(`{
      "acls": [{ "action": "accept", "src": ["100.64.0.0/24"], "dst": ["*:22"] }],
      "tests": [{ "src": "ops", "accept": ["10.9.9.9:22"], "deny": ["[fd00::9]:22"] }],
    }`);
    assert.deepEqual(
      runPolicyTests(policy, fleet).map((o) => [o.passed, o.message]),
      [
        [true, 'accept 10.9.9.9:22 from ops: ok'],
        [true, 'deny [fd00::9]:22 from ops: ok'],
      ],
    );
  });

  it('accepts any port of a list, and every port for `*`', () => {
    const policy = parsePolicy(`{
      "tagOwners": { "tag:ops": [] },
      "acls": [
        { "action": "accept", "src": ["tag:ops"], "dst": ["firewall:22,80"] },
        { "action": "accept", "src": ["tag:ops"], "dst": ["machine:*"] },
      ],
      "tests": [{ "src": "ops", "accept": ["firewall:80", "firewall:22", "machine:5432"], "deny": ["firewall:443"] }],
    }`);
    assert.deepEqual(
      runPolicyTests(policy, fleet).map((o) => [o.dst, o.passed]),
      [
        ['firewall:80', true],
        ['firewall:22', true],
        ['machine:5432', true],
        ['firewall:443', true],
      ],
    );
  });
});

describe('compilePolicy at scale', () => {
  it('compiles a tag policy for 10,000 nodes and builds every filter', () => {
    const roles = ['ops', 'firewall', 'machine', 'monitor', 'storage'];
    const nodes: PolicyNode[] = Array.from({ length: 10_000 }, (_, i) => ({
      id: `n${i}`,
      name: `node-${i}`,
      ips: [`100.64.${i >> 8}.${i & 255}`, `fd7a:115c:a1e0::${i.toString(16)}`],
      tags: [`tag:${roles[i % roles.length]}`],
      owner: `key-${i % 100}`,
    }));
    const policy = parsePolicy(`{
      "tagOwners": { "tag:ops": [], "tag:firewall": [], "tag:machine": [], "tag:monitor": [], "tag:storage": [] },
      "acls": [
        { "action": "accept", "src": ["tag:ops"], "dst": ["tag:firewall:22", "tag:machine:22"] },
        { "action": "accept", "src": ["tag:monitor"], "dst": ["tag:firewall:9100", "tag:machine:9100"] },
        { "action": "accept", "src": ["tag:machine"], "dst": ["tag:storage:2049,111"] },
        { "action": "accept", "src": ["tag:firewall"], "dst": ["tag:monitor:9090"] },
        { "action": "accept", "src": ["tag:ops"], "dst": ["tag:monitor:3000"], "proto": "tcp" },
      ],
    }`);
    const compiled = compilePolicy(policy, nodes);
    let specs = 0;
    for (const n of nodes) specs += compiled.filterFor(n.id).length;
    // Firewalls, machines and monitors get two specs each (one per source tag), storage nodes one, ops none.
    assert.equal(specs, 2000 * 2 + 2000 * 2 + 2000 + 2000 * 2);
    const firewallFilter = compiled.filterFor('n1');
    assert.equal(firewallFilter[0]?.srcCidrs.length, 4000);
    assert.equal(compiled.canSee('n0', 'n1'), true);
    assert.equal(compiled.canSee('n0', 'n5'), false);
  });
});
