import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  type FirewallSpec,
  InvalidFirewallSpecError,
  renderFirewall,
  renderRemoval,
} from '../../agent/firewall/render.js';

const spec: FirewallSpec = {
  meshInterface: 'mesh0',
  filter: [
    {
      srcCidrs: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'],
      dstCidrs: ['100.64.0.2', 'fd7a:115c:a1e0::2'],
      ports: [
        { first: 22, last: 22 },
        { first: 8000, last: 8099 },
      ],
      protocols: ['tcp'],
    },
    { srcCidrs: ['100.64.0.0/10'], dstCidrs: ['100.64.0.2/32'], ports: [], protocols: [] },
  ],
  lockdownPorts: [22],
};

function chainBody(script: string): string[] {
  const lines = script.split('\n').map((l) => l.trim());
  return lines.slice(lines.indexOf('chain input {') + 2, lines.lastIndexOf('}') - 1);
}

describe('renderFirewall', () => {
  test('replaces the table in one transaction', () => {
    const lines = renderFirewall(spec).split('\n');
    assert.deepEqual(lines.slice(0, 5), [
      'table inet meshgate {}',
      'delete table inet meshgate',
      'table inet meshgate {',
      '  chain input {',
      '    type filter hook input priority filter - 10; policy accept;',
    ]);
  });

  test('filters new mesh connections by the rules and drops the rest on the mesh', () => {
    assert.deepEqual(chainBody(renderFirewall(spec)), [
      'iifname != { "lo", "mesh0" } tcp dport { 22 } drop',
      'iifname "mesh0" ct state established,related accept',
      'iifname "mesh0" ct state invalid drop',
      'iifname "mesh0" ip saddr { 100.64.0.1/32 } ip daddr { 100.64.0.2/32 } meta l4proto { tcp } th dport { 22, 8000-8099 } accept',
      'iifname "mesh0" ip6 saddr { fd7a:115c:a1e0::1/128 } ip6 daddr { fd7a:115c:a1e0::2/128 } meta l4proto { tcp } th dport { 22, 8000-8099 } accept',
      'iifname "mesh0" ip saddr { 100.64.0.0/10 } ip daddr { 100.64.0.2/32 } meta l4proto { tcp, udp } accept',
      'iifname "mesh0" ip saddr { 100.64.0.0/10 } ip daddr { 100.64.0.2/32 } icmp type echo-request accept',
      'iifname "mesh0" drop',
    ]);
  });

  test('no lockdown rule without lockdown ports; several ports share one set', () => {
    assert.ok(!renderFirewall({ ...spec, lockdownPorts: [] }).includes('iifname !='));
    assert.match(renderFirewall({ ...spec, lockdownPorts: [22, 2222, 22] }), /tcp dport \{ 22, 2222 \} drop/);
  });

  test('ICMP for IPv6 is icmpv6; a family without a source or a destination gets no rule', () => {
    const body = chainBody(
      renderFirewall({
        meshInterface: 'mesh0',
        lockdownPorts: [],
        filter: [
          { srcCidrs: ['fd7a:115c:a1e0::/48'], dstCidrs: ['::/0'], ports: [], protocols: ['icmp'] },
          { srcCidrs: ['100.64.0.1'], dstCidrs: ['fd7a:115c:a1e0::2'], ports: [], protocols: [] },
        ],
      }),
    );
    assert.deepEqual(body.slice(2, -1), [
      'iifname "mesh0" ip6 saddr { fd7a:115c:a1e0::/48 } ip6 daddr { ::/0 } icmpv6 type echo-request accept',
    ]);
  });

  test("accepts metal-stack's tailscale0, so its own rules for tailscale* keep matching", () => {
    const body = chainBody(renderFirewall({ ...spec, meshInterface: 'tailscale0' }));
    assert.equal(body[0], 'iifname != { "lo", "tailscale0" } tcp dport { 22 } drop');
    assert.equal(body.at(-1), 'iifname "tailscale0" drop');
  });

  test('rejects interface names that could escape the script', () => {
    for (const bad of ['mesh0" accept', 'a-name-that-is-too-long', '', 'mesh 0', 'mesh0;']) {
      assert.throws(() => renderFirewall({ ...spec, meshInterface: bad }), InvalidFirewallSpecError, bad);
    }
  });

  test('rejects bad CIDRs, ports and protocols', () => {
    const rule = spec.filter[0]!;
    const bad: FirewallSpec[] = [
      { ...spec, filter: [{ ...rule, srcCidrs: ['100.64.0.1/32 } accept'] }] },
      { ...spec, filter: [{ ...rule, dstCidrs: ['300.1.1.1'] }] },
      { ...spec, filter: [{ ...rule, ports: [{ first: 0, last: 22 }] }] },
      { ...spec, filter: [{ ...rule, ports: [{ first: 90, last: 80 }] }] },
      { ...spec, filter: [{ ...rule, protocols: ['sctp' as 'tcp'] }] },
      { ...spec, lockdownPorts: [65536] },
    ];
    for (const s of bad) assert.throws(() => renderFirewall(s), InvalidFirewallSpecError);
    assert.throws(() => renderFirewall(bad[0]!), /filter rule 1: not an IP prefix/);
  });
});

test("forwards peers' WireGuard ports addressed to this host, and refuses junk", () => {
  const script = renderFirewall({
    meshInterface: 'mg0',
    filter: [],
    lockdownPorts: [],
    portForwards: [{ port: 42080, to: '10.20.0.11' }],
  });
  assert.match(
    script,
    /chain prerouting \{\n\s+type nat hook prerouting priority dstnat; policy accept;\n\s+fib daddr type local udp dport 42080 dnat ip to 10\.20\.0\.11:42080\n/,
  );
  assert.doesNotMatch(renderFirewall({ meshInterface: 'mg0', filter: [], lockdownPorts: [] }), /prerouting/);
  const bad =
    (to: string, port = 1) =>
    () =>
      renderFirewall({ meshInterface: 'mg0', filter: [], lockdownPorts: [], portForwards: [{ port, to }] });
  assert.throws(bad('fd00::1'), /not an IPv4 address/);
  assert.throws(bad('10.0.0.0/8'), /not an IPv4 address/);
  assert.throws(bad('10.0.0.1; flush ruleset'), InvalidFirewallSpecError);
  assert.throws(bad('10.0.0.1', 0), /not 1..65535/);
});

test('renderRemoval deletes the table whether or not it exists', () => {
  assert.equal(renderRemoval(), 'table inet meshgate {}\ndelete table inet meshgate\n');
});

test('renders the whole script, prerouting chain included, exactly as nft reads it', () => {
  const script = renderFirewall({
    meshInterface: 'mg0',
    filter: [
      {
        srcCidrs: ['100.64.0.1'],
        dstCidrs: ['100.64.0.2'],
        ports: [{ first: 65535, last: 65535 }],
        protocols: ['udp'],
      },
    ],
    lockdownPorts: [65535],
    portForwards: [{ port: 51820, to: '10.20.0.11/32' }],
  });
  assert.equal(
    script,
    [
      'table inet meshgate {}',
      'delete table inet meshgate',
      'table inet meshgate {',
      '  chain input {',
      '    type filter hook input priority filter - 10; policy accept;',
      '    iifname != { "lo", "mg0" } tcp dport { 65535 } drop',
      '    iifname "mg0" ct state established,related accept',
      '    iifname "mg0" ct state invalid drop',
      '    iifname "mg0" ip saddr { 100.64.0.1/32 } ip daddr { 100.64.0.2/32 } meta l4proto { udp } th dport { 65535 } accept',
      '    iifname "mg0" drop',
      '  }',
      '  chain prerouting {',
      '    type nat hook prerouting priority dstnat; policy accept;',
      '    fib daddr type local udp dport 51820 dnat ip to 10.20.0.11:51820',
      '  }',
      '}',
      '',
    ].join('\n'),
  );
});

test('says which rule, port or forward is wrong, so the log line leads to the cause', () => {
  const rule = { srcCidrs: ['100.64.0.1'], dstCidrs: ['100.64.0.2'], ports: [], protocols: [] };
  const base: FirewallSpec = { meshInterface: 'mg0', filter: [], lockdownPorts: [] };
  const cases: [FirewallSpec, string][] = [
    [{ ...base, lockdownPorts: [0] }, 'invalid firewall spec: lockdown port 0 is not 1..65535'],
    [{ ...base, lockdownPorts: [65536] }, 'invalid firewall spec: lockdown port 65536 is not 1..65535'],
    [{ ...base, lockdownPorts: [22.5] }, 'invalid firewall spec: lockdown port 22.5 is not 1..65535'],
    [
      { ...base, filter: [rule, { ...rule, protocols: ['sctp' as 'tcp'] }] },
      'invalid firewall spec: filter rule 2: unknown protocol sctp',
    ],
    [
      { ...base, filter: [{ ...rule, ports: [{ first: 70000, last: 70001 }] }] },
      'invalid firewall spec: filter rule 1 port 70000 is not 1..65535',
    ],
    [
      { ...base, filter: [{ ...rule, ports: [{ first: 22, last: 70000 }] }] },
      'invalid firewall spec: filter rule 1 port 70000 is not 1..65535',
    ],
    [
      { ...base, filter: [{ ...rule, ports: [{ first: 90, last: 80 }] }] },
      'invalid firewall spec: filter rule 1: port range 90-80 is reversed',
    ],
    [
      { ...base, portForwards: [{ port: 0, to: '10.0.0.1' }] },
      'invalid firewall spec: forwarded port 0 is not 1..65535',
    ],
    [
      {
        ...base,
        portForwards: [
          { port: 41000, to: '10.0.0.1' },
          { port: 41000, to: '10.0.0.2' },
        ],
      },
      'invalid firewall spec: port 41000 is forwarded twice',
    ],
    [
      { ...base, portForwards: [{ port: 41000, to: 'fd00::/32' }] },
      'invalid firewall spec: forward of port 41000: fd00::/32 is not an IPv4 address',
    ],
  ];
  for (const [s, message] of cases) {
    assert.throws(
      () => renderFirewall(s),
      (e: unknown) => e instanceof InvalidFirewallSpecError && e.message === message,
    );
  }
  assert.throws(
    () => renderFirewall({ ...base, portForwards: [{ port: 41000, to: '10.0.0.1; flush ruleset' }] }),
    /^InvalidFirewallSpecError: invalid firewall spec: forward of port 41000: .+/,
  );
});
