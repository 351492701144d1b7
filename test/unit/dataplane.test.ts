import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { InvalidCidrError, normalizeCidr, normalizeInterfaceAddress } from '../../agent/dataplane/cidr.js';
import type { ActualPeer } from '../../agent/dataplane/dump.js';
import { DumpParseError, parseDump } from '../../agent/dataplane/dump.js';
import { CommandError, MissingToolError, run } from '../../agent/dataplane/exec.js';
import { planLink } from '../../agent/dataplane/link.js';
import {
  type DesiredPeer,
  InvalidPeerError,
  normalizeEndpoint,
  planInterfaceArgs,
  planPeers,
  wgSetCommands,
} from '../../agent/dataplane/reconcile.js';
import { encodeWgKey, generateNodeKey } from '../../proto/keys.js';

const key = () => encodeWgKey(generateNodeKey().publicKey);

const PRIVATE = 'kHXvxwwYm9tQ/bc0WNTCTfnkkLFKOIs8ThrHL+RhlnE=';
const PSK = 'Dz6Kq7s2yrb8pUqy1oV1oyP0v1QkPpGgkS8b0hHxS3s=';
const A = 'rB98JmTtY7TXq6msBdoFV79nHDxCa6vbrbguisvgc2g=';
const B = 'EM7RHEdFYGZebDGt4GMq1xreHjTV1Db8aXprO2VdImY=';

describe('parseDump', () => {
  const dump = [
    `${PRIVATE}\t${A}\t51820\toff`,
    `${B}\t(none)\t[fd00::1]:51820\t10.0.0.0/8,fd00::/64\t1700000000\t1234\t5678\t25`,
    `${A}\t${PSK}\t(none)\t(none)\t0\t0\t0\toff`,
    '',
  ].join('\n');

  test('reads the interface and its peers', () => {
    const parsed = parseDump(dump);
    assert.equal(parsed.publicKey, A);
    assert.equal(parsed.listenPort, 51820);
    assert.equal(parsed.fwmark, null);
    assert.deepEqual(parsed.peers[0], {
      publicKey: B,
      hasPresharedKey: false,
      endpoint: '[fd00::1]:51820',
      allowedIps: ['10.0.0.0/8', 'fd00::/64'],
      latestHandshake: 1700000000,
      rxBytes: 1234,
      txBytes: 5678,
      persistentKeepalive: 25,
    });
    assert.deepEqual(parsed.peers[1], {
      publicKey: A,
      hasPresharedKey: true,
      endpoint: null,
      allowedIps: [],
      latestHandshake: 0,
      rxBytes: 0,
      txBytes: 0,
      persistentKeepalive: 0,
    });
  });

  test('keeps neither the private key nor preshared keys', () => {
    const text = JSON.stringify(parseDump(dump));
    assert.ok(!text.includes(PRIVATE));
    assert.ok(!text.includes(PSK));
  });

  test('an interface without a key and with a fwmark', () => {
    const parsed = parseDump('(none)\t(none)\t42264\t51820\n');
    assert.equal(parsed.publicKey, null);
    assert.equal(parsed.fwmark, 51820);
    assert.deepEqual(parsed.peers, []);
  });

  test('rejects malformed output without echoing the key', () => {
    assert.throws(() => parseDump(''), DumpParseError);
    assert.throws(
      () => parseDump(`${PRIVATE}\t${A}\tnope\toff`),
      (e: Error) => {
        assert.ok(e instanceof DumpParseError);
        assert.ok(!e.message.includes(PRIVATE));
        return true;
      },
    );
    assert.throws(() => parseDump(`${PRIVATE}\t${A}\t1\toff\n${B}\t(none)`), DumpParseError);
  });
});

describe('normalizeCidr', () => {
  test('clears host bits and writes one canonical form', () => {
    assert.equal(normalizeCidr('10.1.2.3/8'), '10.0.0.0/8');
    assert.equal(normalizeCidr('100.64.0.7'), '100.64.0.7/32');
    assert.equal(normalizeCidr('FD7A:115C:A1E0:0:0:0:0:1/128'), 'fd7a:115c:a1e0::1/128');
    assert.equal(normalizeCidr('fd7a:115c:a1e0::5/48'), 'fd7a:115c:a1e0::/48');
    assert.equal(normalizeCidr('::ffff:192.0.2.1/128'), '::ffff:c000:201/128');
    assert.equal(normalizeCidr('2001:db8:0:0:1:0:0:1'), '2001:db8::1:0:0:1/128');
    assert.equal(normalizeCidr('0.0.0.0/0'), '0.0.0.0/0');
    assert.equal(normalizeCidr('::/0'), '::/0');
  });

  test('interface addresses keep their host bits', () => {
    assert.equal(normalizeInterfaceAddress('100.64.0.1/10'), '100.64.0.1/10');
    assert.equal(normalizeInterfaceAddress('fd7a:115c:a1e0:0::1'), 'fd7a:115c:a1e0::1/128');
  });

  test('rejects anything that is not a prefix', () => {
    for (const bad of [
      '',
      '10.0.0.0/33',
      '10.0.0/8',
      '1.2.3.4/8 drop',
      'fe80::1%eth0/64',
      '::/129',
      'x',
      '10.0.0.1/',
    ]) {
      assert.throws(() => normalizeCidr(bad), InvalidCidrError, bad);
    }
  });
});

describe('normalizeEndpoint', () => {
  test('canonical addresses, hostnames kept, garbage refused', () => {
    assert.equal(normalizeEndpoint('198.51.100.2:51820'), '198.51.100.2:51820');
    assert.equal(normalizeEndpoint('[FD00:0::1]:1'), '[fd00::1]:1');
    assert.equal(normalizeEndpoint('vpn.example.org:51820'), 'vpn.example.org:51820');
    assert.equal(normalizeEndpoint('198.51.100.2'), null);
    assert.equal(normalizeEndpoint('198.51.100.2:70000'), null);
    assert.equal(normalizeEndpoint('fd00::1:51820'), null);
  });
});

function actual(peer: Partial<ActualPeer> & { publicKey: string }): ActualPeer {
  return {
    hasPresharedKey: false,
    endpoint: null,
    allowedIps: [],
    latestHandshake: 0,
    rxBytes: 0,
    txBytes: 0,
    persistentKeepalive: 0,
    ...peer,
  };
}

describe('planPeers', () => {
  const p1 = key();
  const p2 = key();
  const have1 = actual({
    publicKey: p1,
    endpoint: '198.51.100.1:51820',
    allowedIps: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'],
    latestHandshake: 1700000000,
    persistentKeepalive: 25,
  });
  const want1: DesiredPeer = {
    publicKey: p1,
    allowedIps: ['fd7a:115c:a1e0::1/128', '100.64.0.1/32'],
    endpoint: '198.51.100.1:51820',
    persistentKeepalive: 25,
  };

  test('adds a new peer with everything it needs', () => {
    const ops = planPeers([want1], []);
    assert.deepEqual(ops, [
      {
        kind: 'add',
        publicKey: p1,
        allowedIps: ['fd7a:115c:a1e0::1/128', '100.64.0.1/32'],
        endpoint: '198.51.100.1:51820',
        persistentKeepalive: 25,
      },
    ]);
    assert.deepEqual(wgSetCommands('mg0', [], ops), [
      [
        'set',
        'mg0',
        'peer',
        p1,
        'endpoint',
        '198.51.100.1:51820',
        'persistent-keepalive',
        '25',
        'allowed-ips',
        'fd7a:115c:a1e0::1/128,100.64.0.1/32',
      ],
    ]);
  });

  test('removes peers that are no longer wanted', () => {
    const ops = planPeers([], [have1]);
    assert.deepEqual(ops, [{ kind: 'remove', publicKey: p1 }]);
    assert.deepEqual(wgSetCommands('mg0', [], ops), [['set', 'mg0', 'peer', p1, 'remove']]);
  });

  test('nothing to do when only the order of allowed IPs or their spelling differs', () => {
    const spelled = { ...want1, allowedIps: ['FD7A:115C:A1E0:0::1', '100.64.0.1'] };
    assert.deepEqual(planPeers([spelled], [have1]), []);
    assert.deepEqual(wgSetCommands('mg0', [], []), []);
  });

  test('an unrelated new peer leaves existing peers untouched', () => {
    const ops = planPeers([want1, { publicKey: p2, allowedIps: ['100.64.0.9/32'] }], [have1]);
    assert.deepEqual(ops, [{ kind: 'add', publicKey: p2, allowedIps: ['100.64.0.9/32'] }]);
  });

  test('a changed endpoint is only forced when asked for; an unset one is always filled in', () => {
    const moved = { ...want1, endpoint: '203.0.113.7:41641' };
    assert.deepEqual(planPeers([moved], [have1]), []);
    assert.deepEqual(planPeers([moved], [have1], { endpointPolicy: 'ifUnset' }), []);
    assert.deepEqual(planPeers([moved], [have1], { endpointPolicy: 'force' }), [
      { kind: 'update', publicKey: p1, endpoint: '203.0.113.7:41641' },
    ]);
    assert.deepEqual(planPeers([moved], [{ ...have1, endpoint: null }]), [
      { kind: 'update', publicKey: p1, endpoint: '203.0.113.7:41641' },
    ]);
  });

  test('an IPv6 endpoint in another spelling is the same endpoint', () => {
    const v6 = { ...have1, endpoint: '[fd00::1]:51820' };
    assert.deepEqual(
      planPeers([{ ...want1, endpoint: '[FD00:0:0::1]:51820' }], [v6], { endpointPolicy: 'force' }),
      [],
    );
  });

  test('only the fields that differ are set', () => {
    const ops = planPeers(
      [{ ...want1, allowedIps: ['100.64.0.1/32'], persistentKeepalive: undefined }],
      [have1],
    );
    assert.deepEqual(ops, [
      { kind: 'update', publicKey: p1, allowedIps: ['100.64.0.1/32'], persistentKeepalive: 0 },
    ]);
    assert.deepEqual(wgSetCommands('mg0', [], ops)[0]?.slice(2), [
      'peer',
      p1,
      'persistent-keepalive',
      '0',
      'allowed-ips',
      '100.64.0.1/32',
    ]);
  });

  test('an update can empty the allowed IPs', () => {
    const ops = planPeers([{ ...want1, allowedIps: [] }], [have1]);
    assert.deepEqual(wgSetCommands('mg0', [], ops)[0]?.slice(-2), ['allowed-ips', '']);
  });

  test('removals come before updates, updates before additions', () => {
    const p3 = key();
    const ops = planPeers(
      [
        { ...want1, allowedIps: [] },
        { publicKey: p3, allowedIps: [] },
      ],
      [have1, actual({ publicKey: p2 })],
    );
    assert.deepEqual(
      ops.map((o) => [o.kind, o.publicKey]),
      [
        ['remove', p2],
        ['update', p1],
        ['add', p3],
      ],
    );
  });

  test('refuses malformed peers', () => {
    assert.throws(() => planPeers([{ publicKey: 'nope', allowedIps: [] }], []), InvalidPeerError);
    assert.throws(() => planPeers([{ publicKey: p1, allowedIps: ['10.0.0.0/99'] }], []), InvalidPeerError);
    assert.throws(() => planPeers([{ publicKey: p1, allowedIps: [], endpoint: 'x' }], []), InvalidPeerError);
    assert.throws(
      () => planPeers([{ publicKey: p1, allowedIps: [], persistentKeepalive: -1 }], []),
      InvalidPeerError,
    );
    assert.throws(
      () =>
        planPeers(
          [
            { publicKey: p1, allowedIps: [] },
            { publicKey: p1, allowedIps: [] },
          ],
          [],
        ),
      /listed twice/,
    );
  });

  test('1000 peers are split into several wg set calls, each within the size limit', () => {
    const desired: DesiredPeer[] = Array.from({ length: 1000 }, (_, i) => ({
      publicKey: key(),
      allowedIps: [`100.64.${i >> 8}.${i & 255}/32`, `fd7a:115c:a1e0::${i.toString(16)}/128`],
      endpoint: `198.51.100.${i % 250}:51820`,
      persistentKeepalive: 25,
    }));
    const ops = planPeers(desired, []);
    const maxArgBytes = 32 * 1024;
    const cmds = wgSetCommands('mg0', ['listen-port', '51820'], ops, maxArgBytes);
    assert.ok(cmds.length > 1, `expected several calls, got ${cmds.length}`);
    assert.deepEqual(cmds[0]?.slice(0, 4), ['set', 'mg0', 'listen-port', '51820']);
    for (const c of cmds) {
      assert.deepEqual(c.slice(0, 2), ['set', 'mg0']);
      assert.ok(c.reduce((n, a) => n + Buffer.byteLength(a) + 1, 0) <= maxArgBytes);
    }
    for (const c of cmds.slice(1)) assert.ok(!c.includes('listen-port'));
    const configured = cmds.flatMap((c) => c.filter((_, i) => c[i - 1] === 'peer'));
    assert.deepEqual(
      configured,
      desired.map((p) => p.publicKey),
    );
  });
});

describe('planInterfaceArgs', () => {
  const dumpOf = (publicKey: string | null, listenPort: number) => ({
    publicKey,
    listenPort,
    fwmark: null,
    peers: [],
  });

  test('sets the key and port only when they differ', () => {
    const want = { privateKeyFile: '/state/wg.key', listenPort: 51820 };
    assert.deepEqual(planInterfaceArgs(want, A, dumpOf(null, 40000)), [
      'private-key',
      '/state/wg.key',
      'listen-port',
      '51820',
    ]);
    assert.deepEqual(planInterfaceArgs(want, A, dumpOf(A, 51820)), []);
    assert.deepEqual(planInterfaceArgs({ ...want, listenPort: 0 }, A, dumpOf(A, 40000)), []);
  });
});

describe('planLink', () => {
  const config = { addresses: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'], routes: ['10.10.0.0/16'] };

  test('a fresh interface gets MTU, addresses and routes', () => {
    assert.deepEqual(planLink('mg0', config, { up: false, mtu: 1420, addresses: [], routes: [] }), [
      ['link', 'set', 'dev', 'mg0', 'mtu', '1280', 'up'],
      ['-4', 'addr', 'add', '100.64.0.1/32', 'dev', 'mg0'],
      ['-6', 'addr', 'add', 'fd7a:115c:a1e0::1/128', 'dev', 'mg0', 'nodad'],
      ['-4', 'route', 'replace', '100.64.0.0/10', 'dev', 'mg0'],
      ['-6', 'route', 'replace', 'fd7a:115c:a1e0::/48', 'dev', 'mg0'],
      ['-4', 'route', 'replace', '10.10.0.0/16', 'dev', 'mg0'],
    ]);
  });

  test('an interface that is already right needs nothing', () => {
    const state = {
      up: true,
      mtu: 1280,
      addresses: ['100.64.0.1/32', 'fd7a:115c:a1e0::1/128'],
      routes: ['10.10.0.0/16', '100.64.0.0/10', 'fd7a:115c:a1e0::/48'],
    };
    assert.deepEqual(planLink('mg0', config, state), []);
  });

  test('stale addresses and routes are removed', () => {
    const state = {
      up: true,
      mtu: 1280,
      addresses: ['100.64.0.1/32', '100.64.0.99/32', 'fd7a:115c:a1e0::1/128'],
      routes: ['10.10.0.0/16', '10.20.0.0/16', '100.64.0.0/10', 'fd7a:115c:a1e0::/48'],
    };
    assert.deepEqual(planLink('mg0', config, state), [
      ['-4', 'addr', 'del', '100.64.0.99/32', 'dev', 'mg0'],
      ['-4', 'route', 'del', '10.20.0.0/16', 'dev', 'mg0'],
    ]);
  });
});

describe('run', () => {
  test('returns stdout and passes stdin', async () => {
    assert.equal(
      await run(process.execPath, ['-e', 'process.stdin.pipe(process.stdout)'], { input: 'hi' }),
      'hi',
    );
  });

  test('a failing command names itself, its exit code and the first line of stderr', async () => {
    const err = await run(process.execPath, [
      '-e',
      'console.error("\\nbad thing\\nmore"); process.exit(3)',
    ]).catch((e: unknown) => e);
    assert.ok(err instanceof CommandError);
    assert.equal(err.exitCode, 3);
    assert.match(err.message, /failed \(exit 3\): bad thing$/);
  });

  test('a missing binary says what to install', async () => {
    await assert.rejects(run('wg-not-installed-here', []), (e: Error) => e instanceof MissingToolError);
    const wg = new MissingToolError('wg');
    assert.equal(wg.message, 'wg not found: install wireguard-tools');
  });

  test('a hanging command is killed', async () => {
    await assert.rejects(
      run(process.execPath, ['-e', 'setTimeout(() => {}, 10000)'], { timeoutMs: 200 }),
      /timed out/,
    );
  });
});
