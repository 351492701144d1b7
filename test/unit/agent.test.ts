import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import { Backoff } from '../../agent/control/backoff.js';
import {
  defaultListenPort,
  type LocalAddress,
  orderCandidates,
  PathSelector,
} from '../../agent/control/endpoints.js';
import type { AgentStatus } from '../../agent/localapi/types.js';
import { resolvePeer, splitSshArgs } from '../../cli/commands/local.js';
import { SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import { NetMapSchema, PeerSchema } from '../../proto/gen/meshgate/v1/types_pb.js';
import { applySync, SequenceError } from '../../proto/netmap.js';

describe('endpoint candidates', () => {
  const locals: LocalAddress[] = [{ address: '10.1.0.5', family: 4, cidr: '10.1.0.5/24' }];
  it('tries the same subnet first, then the rest, IPv6 last', () => {
    assert.deepEqual(orderCandidates(['[2001:db8::1]:1', '198.51.100.7:1', '10.1.0.9:1'], locals), [
      '10.1.0.9:1',
      '198.51.100.7:1',
      '[2001:db8::1]:1',
    ]);
  });
  it('moves on when no handshake completes, and sticks once one did', () => {
    let now = 0;
    const paths = new PathSelector(5000, () => now);
    assert.deepEqual(paths.choose('k', ['a:1', 'b:1'], 0), { endpoint: 'a:1', force: true });
    now = 4000;
    assert.deepEqual(paths.choose('k', ['a:1', 'b:1'], 0), { endpoint: 'a:1', force: false });
    now = 5000;
    assert.deepEqual(paths.choose('k', ['a:1', 'b:1'], 0), { endpoint: 'b:1', force: true });
    now = 20_000;
    assert.deepEqual(
      paths.choose('k', ['a:1', 'b:1'], 19_000),
      { endpoint: 'b:1', force: false },
      'handshake: stay',
    );
  });
  it('spreads listen ports by machine key so nodes behind one NAT differ', () => {
    const p = defaultListenPort(new Uint8Array([1, 2]));
    assert.ok(p >= 41641 && p < 42641);
    assert.notEqual(p, defaultListenPort(new Uint8Array([9, 9])));
  });
});

describe('backoff', () => {
  it('grows exponentially with jitter up to the cap, and resets', () => {
    const b = new Backoff(100, 1000, () => 1);
    assert.deepEqual([b.next(), b.next(), b.next(), b.next(), b.next()], [100, 200, 400, 800, 1000]);
    b.reset();
    assert.equal(b.next(), 100);
    assert.equal(new Backoff(100, 1000, () => 0).next(), 50);
  });
});

describe('netmap deltas', () => {
  const peer = (id: string) => create(PeerSchema, { id, name: id, nodeKey: id });
  it('applies a full map, then changes, removals and patches in sequence', () => {
    let m = applySync(
      null,
      0n,
      create(SyncResponseSchema, { seq: 1n, full: create(NetMapSchema, { peers: [peer('a'), peer('b')] }) }),
    );
    m = applySync(
      m,
      1n,
      create(SyncResponseSchema, { seq: 2n, peersChanged: [peer('c')], peersRemoved: ['a'] }),
    );
    m = applySync(
      m,
      2n,
      create(SyncResponseSchema, {
        seq: 3n,
        peerPatches: [{ id: 'b', online: true, endpointsChanged: true, endpoints: ['192.0.2.1:1'] }],
      }),
    );
    assert.deepEqual(m!.peers.map((p) => p.id).sort(), ['b', 'c']);
    const b = m!.peers.find((p) => p.id === 'b')!;
    assert.equal(b.online, true);
    assert.deepEqual(b.endpoints, ['192.0.2.1:1']);
  });
  it('refuses a gap in the sequence, so the agent resyncs', () => {
    const m = applySync(null, 0n, create(SyncResponseSchema, { seq: 1n, full: create(NetMapSchema, {}) }));
    assert.throws(
      () => applySync(m, 1n, create(SyncResponseSchema, { seq: 3n, keepalive: true })),
      SequenceError,
    );
  });
});

describe('meshgate ssh arguments', () => {
  it('puts options before the destination and the command after it', () => {
    assert.deepEqual(splitSshArgs(['-l', 'root', '-o', 'A=b', '-v', 'uptime', '-x']), [
      ['-l', 'root', '-o', 'A=b', '-v'],
      ['uptime', '-x'],
    ]);
  });
  it('resolves peers by name, IP or unique id prefix', () => {
    const peers = [
      { id: 'abc123', name: 'fw', ipAddresses: ['100.64.0.2'] },
      { id: 'abd456', name: 'm1', ipAddresses: ['100.64.0.3'] },
    ];
    const s = { peers } as unknown as AgentStatus;
    assert.equal(resolvePeer(s, 'fw').id, 'abc123');
    assert.equal(resolvePeer(s, '100.64.0.3').name, 'm1');
    assert.equal(resolvePeer(s, 'abd').name, 'm1');
    assert.throws(() => resolvePeer(s, 'ab'), /matches 2 peers/);
    assert.throws(() => resolvePeer(s, 'zz'), /no peer "zz".*peers: fw, m1/);
  });
});
