import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import { Backoff } from '../../agent/control/backoff.js';
import type { ControlClient } from '../../agent/control/client.js';
import {
  defaultListenPort,
  type LocalAddress,
  orderCandidates,
  type PathInput,
  PathSelector,
  RELAY,
} from '../../agent/control/endpoints.js';
import { type ConnectionState, ControlSession } from '../../agent/control/session.js';
import type { AgentStatus } from '../../agent/localapi/types.js';
import { resolvePeer, splitSshArgs } from '../../cli/commands/local.js';
import { RegisterResponseSchema, SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import { type NetMap, NetMapSchema, NodeSchema, PeerSchema } from '../../proto/gen/meshgate/v1/types_pb.js';
import { REASON_TRAILER } from '../../proto/grpc.js';
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
  const timings = { trialMs: 3000, relayAfterMs: 6000, probeEveryMs: 30_000, probeWindowMs: 3000 };
  const input = (over: Partial<PathInput> = {}): PathInput => ({
    candidates: ['a:1', 'b:1'],
    actual: null,
    lastHandshakeMs: 0,
    rxBytes: 0,
    relayAvailable: true,
    relayEndpoint: undefined,
    ...over,
  });

  it('tries each direct candidate, then the relay when no handshake completes', () => {
    let now = 0;
    const paths = new PathSelector(timings, () => now);
    assert.equal(paths.choose('p', input()).endpoint, 'a:1');
    now = 3000;
    assert.equal(paths.choose('p', input({ actual: 'a:1' })).endpoint, 'b:1');
    now = 6000;
    assert.equal(paths.choose('p', input({ actual: 'b:1' })).endpoint, RELAY);
  });

  it('sticks to a direct path that has a handshake, following roaming', () => {
    let now = 0;
    const paths = new PathSelector(timings, () => now);
    paths.choose('p', input());
    now = 10_000;
    assert.equal(
      paths.choose('p', input({ actual: '198.51.100.9:4000', lastHandshakeMs: 9000 })).endpoint,
      '198.51.100.9:4000',
    );
  });

  it('probes a relayed peer directly now and then, and keeps the direct path when the peer answers on it', () => {
    let now = 0;
    const paths = new PathSelector(timings, () => now);
    const relayed = {
      actual: '127.0.0.1:5000',
      relayEndpoint: '127.0.0.1:5000',
      lastHandshakeMs: 1,
      rxBytes: 100,
    };
    paths.choose('p', input({ candidates: [] }));
    now = 1000;
    assert.equal(
      paths.choose('p', input({ ...relayed, candidates: [], lastHandshakeMs: 900 })).endpoint,
      RELAY,
    );
    // The peer got a direct endpoint later: probe it after the probe interval.
    now = 2000;
    assert.equal(
      paths.choose('p', input({ ...relayed, lastHandshakeMs: 1900 })).endpoint,
      RELAY,
      'new candidates start over',
    );
    now = 20_000;
    assert.deepEqual(
      paths.choose('p', input({ ...relayed, lastHandshakeMs: 19_000 })),
      { endpoint: RELAY },
      'not yet',
    );
    now = 32_000;
    const started = paths.choose('p', input({ ...relayed, lastHandshakeMs: 31_000 }));
    assert.deepEqual(started, { endpoint: 'a:1', keepalive: 1, probeStarted: { announce: true } });
    now = 35_000;
    assert.deepEqual(
      paths.choose('p', input({ ...relayed, actual: 'a:1', rxBytes: 500, lastHandshakeMs: 34_000 })),
      { endpoint: 'a:1' },
    );
    now = 40_000;
    assert.deepEqual(
      paths.choose('p', input({ ...relayed, actual: 'a:1', rxBytes: 900, lastHandshakeMs: 34_000 })),
      { endpoint: 'a:1' },
      'stays direct',
    );
  });

  it('probes at once when the peer asks, without asking back', () => {
    let now = 0;
    const paths = new PathSelector(timings, () => now);
    const relayed = { actual: '127.0.0.1:5000', relayEndpoint: '127.0.0.1:5000', rxBytes: 100 };
    paths.choose('p', input({ ...relayed, lastHandshakeMs: 1 }));
    now = 1000;
    paths.probeRequested('p');
    assert.deepEqual(paths.choose('p', input({ ...relayed, lastHandshakeMs: 900 })), {
      endpoint: 'a:1',
      keepalive: 1,
      probeStarted: { announce: false },
    });
    assert.ok(paths.probing('p'));
  });

  it('forgets peers that left, so a returning peer tries direct first', () => {
    let now = 0;
    const paths = new PathSelector(timings, () => now);
    paths.choose('p', input());
    paths.retain(new Set());
    now = 120_000;
    assert.equal(paths.choose('p', input()).endpoint, 'a:1');
  });

  it('returns to the relay when a probe gets no answer', () => {
    let now = 0;
    const paths = new PathSelector({ ...timings, probeEveryMs: 1000 }, () => now);
    const relayed = { actual: '127.0.0.1:5000', relayEndpoint: '127.0.0.1:5000', rxBytes: 100 };
    paths.choose('p', input());
    now = 6000;
    paths.choose('p', input());
    now = 6500;
    assert.equal(paths.choose('p', input({ ...relayed, lastHandshakeMs: 6400 })).endpoint, RELAY);
    now = 7000;
    assert.equal(
      paths.choose('p', input({ ...relayed, lastHandshakeMs: 6500 })).keepalive,
      1,
      'probe starts',
    );
    now = 10_000;
    assert.equal(
      paths.choose('p', input({ ...relayed, lastHandshakeMs: 7500 })).endpoint,
      RELAY,
      'no answer: back to the relay',
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
  it('leaves the previous netmap as it was', () => {
    const before = applySync(
      null,
      0n,
      create(SyncResponseSchema, { seq: 1n, full: create(NetMapSchema, { peers: [peer('a'), peer('b')] }) }),
    )!;
    const after = applySync(
      before,
      1n,
      create(SyncResponseSchema, {
        seq: 2n,
        peersRemoved: ['b'],
        peerPatches: [{ id: 'a', online: true, endpointsChanged: true, endpoints: ['192.0.2.1:1'] }],
      }),
    )!;
    assert.deepEqual(
      before.peers.map((p) => [p.id, p.online, p.endpoints]),
      [
        ['a', false, []],
        ['b', false, []],
      ],
    );
    assert.deepEqual(
      after.peers.map((p) => [p.id, p.online, p.endpoints]),
      [['a', true, ['192.0.2.1:1']]],
    );
  });
  it('refuses a gap in the sequence, so the agent resyncs', () => {
    const m = applySync(null, 0n, create(SyncResponseSchema, { seq: 1n, full: create(NetMapSchema, {}) }));
    assert.throws(
      () => applySync(m, 1n, create(SyncResponseSchema, { seq: 3n, keepalive: true })),
      SequenceError,
    );
  });
});

describe('control session', () => {
  class FakeStream extends EventEmitter {
    cancelled = false;
    write() {
      return true;
    }
    cancel() {
      this.cancelled = true;
    }
  }
  const until = async (what: string, pred: () => boolean, ms = 5000) => {
    const deadline = Date.now() + ms;
    while (!pred()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  };

  const info = () => ({
    authKey: () => 'mgk_key',
    nodePublic: new Uint8Array(32),
    machinePublic: new Uint8Array(32),
    hostname: 'h',
    os: 'linux',
    version: '1',
    requestedTags: [],
    advertisedRoutes: [],
    lockdownPorts: [],
    endpoints: () => [],
  });
  const refusal = (code: grpc.status, details: string, reason?: string) => {
    const metadata = new grpc.Metadata();
    if (reason) metadata.set(REASON_TRAILER, reason);
    return Object.assign(new Error(details), { code, details, metadata });
  };
  const registered = create(RegisterResponseSchema, { node: create(NodeSchema, { id: 'n1' }) });

  it('goes offline with the reason when the stream ends or cannot be opened', async () => {
    const streams: FakeStream[] = [];
    let syncs = 0;
    const client = {
      register: async () => registered,
      sync: async () => {
        syncs++;
        if (syncs === 2) throw refusal(grpc.status.UNAVAILABLE, 'connection refused');
        const s = new FakeStream();
        streams.push(s);
        return s;
      },
      close() {},
      failover() {},
    } as unknown as ControlClient;
    const session = new ControlSession(client, info(), true);
    try {
      await session.start();
      await until('the stream', () => streams.length === 1);
      streams[0]!.emit('end');
      assert.equal(session.state, 'offline');
      assert.equal(session.lastError, 'coordinator closed the stream');
      await until('the failed reopening', () => session.lastError === 'connection refused', 5000);
      assert.equal(session.state, 'offline');
    } finally {
      session.stop();
    }
  });

  it('takes a refusal without a reason for a passing fault, not for a deletion', async () => {
    const client = {
      register: async () => {
        throw refusal(grpc.status.UNAUTHENTICATED, 'call time is 600 s off the coordinator clock');
      },
      close() {},
      failover() {},
    } as unknown as ControlClient;
    const session = new ControlSession(client, info(), true);
    try {
      await session.start();
      assert.deepEqual(
        [session.state, session.lastError],
        ['connecting', 'call time is 600 s off the coordinator clock'],
      );
    } finally {
      session.stop();
    }
  });

  it('keeps an expired node expired only when the auth key is refused, not when the coordinator is away', async () => {
    const calls: string[] = [];
    const client = {
      register: async (req: { authKey: string }) => {
        calls.push(req.authKey);
        if (!req.authKey) throw refusal(grpc.status.UNAUTHENTICATED, 'node h has expired', 'node-expired');
        throw refusal(grpc.status.UNAVAILABLE, 'connection reset');
      },
      close() {},
      failover() {},
    } as unknown as ControlClient;
    const session = new ControlSession(client, info(), true);
    try {
      await session.start();
      assert.deepEqual(calls, ['', 'mgk_key']);
      assert.deepEqual([session.state, session.lastError], ['offline', 'connection reset']);
    } finally {
      session.stop();
    }
  });

  it('opens no stream when stopped while registering', async () => {
    let answer: (r: typeof registered) => void = () => {};
    let syncs = 0;
    const client = {
      register: () => new Promise((resolve) => (answer = resolve)),
      sync: async () => {
        syncs++;
        return new FakeStream();
      },
      close() {},
      failover() {},
    } as unknown as ControlClient;
    const session = new ControlSession(client, info(), true);
    const started = session.start();
    session.stop();
    answer(registered);
    await started;
    assert.equal(syncs, 0);
  });

  it('hands on a netmap only when it changed, not on a keepalive', async () => {
    const streams: FakeStream[] = [];
    const client = {
      register: async () => create(RegisterResponseSchema, { node: create(NodeSchema, { id: 'n1' }) }),
      sync: async () => {
        const s = new FakeStream();
        streams.push(s);
        return s;
      },
      close() {},
      failover() {},
    } as unknown as ControlClient;
    const session = new ControlSession(client, { ...info(), authKey: () => '' }, true);
    const netmaps: NetMap[] = [];
    session.on('netmap', (m) => netmaps.push(m));
    try {
      await session.start();
      await until('the stream', () => streams.length === 1);
      const map = create(NetMapSchema, { peers: [create(PeerSchema, { name: 'p' })] });
      streams[0]!.emit('data', create(SyncResponseSchema, { seq: 1n, full: map }));
      streams[0]!.emit('data', create(SyncResponseSchema, { seq: 2n, keepalive: true }));
      assert.equal(netmaps.length, 1);
      assert.equal(session.state, 'connected');
    } finally {
      session.stop();
    }
  });

  it('drops the stream and starts over with a full netmap when a message is missing', async () => {
    const streams: FakeStream[] = [];
    let registrations = 0;
    const client = {
      register: async () => {
        registrations++;
        return create(RegisterResponseSchema, { node: create(NodeSchema, { id: 'n1' }) });
      },
      sync: async () => {
        const s = new FakeStream();
        streams.push(s);
        return s;
      },
      failover() {},
      close() {},
    } as unknown as ControlClient;
    const session = new ControlSession(client, { ...info(), authKey: () => '' }, true);
    const netmaps: NetMap[] = [];
    const states: [ConnectionState, string][] = [];
    session.on('netmap', (m) => netmaps.push(m));
    session.on('state', (s, detail) => states.push([s, detail]));
    const full = (seq: bigint, name: string) =>
      create(SyncResponseSchema, {
        seq,
        full: create(NetMapSchema, { peers: [create(PeerSchema, { name })] }),
      });
    try {
      await session.start();
      await until('the first stream', () => streams.length === 1);
      streams[0]!.emit('data', full(1n, 'first'));
      streams[0]!.emit('data', create(SyncResponseSchema, { seq: 3n, peersRemoved: ['x'] }));
      assert.ok(streams[0]!.cancelled, 'the stream with the gap is dropped');
      assert.deepEqual(states.at(-1), ['offline', 'sync message 3 after 1']);
      assert.equal(netmaps.length, 1, 'the message after the gap is not applied');

      await until('a new stream', () => streams.length === 2);
      assert.equal(registrations, 2, 'registered again before the new stream');
      streams[1]!.emit('data', full(1n, 'again'));
      assert.deepEqual(
        netmaps.map((m) => m.peers[0]?.name),
        ['first', 'again'],
      );
      assert.equal(session.state, 'connected');
    } finally {
      session.stop();
    }
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
