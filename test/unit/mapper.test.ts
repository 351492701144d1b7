import assert from 'node:assert/strict';
import { after, before, describe, it, mock } from 'node:test';
import { create, equals, fromBinary, toBinary } from '@bufbuild/protobuf';
import { Mapper, type MapperOptions, type Session } from '../../coordinator/mapper/mapper.js';
import { filterPieces } from '../../coordinator/mapper/netmap.js';
import { assemble, seqField } from '../../coordinator/mapper/wire.js';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { type SyncResponse, SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import { PeerSchema, Protocol } from '../../proto/gen/meshgate/v1/types_pb.js';
import { encodeWgKey, generateMachineKey, generateNodeKey } from '../../proto/keys.js';
import { slowSends, testMapperOptions } from '../fixtures/mapper.js';
import { registerTestNode } from '../fixtures/nodes.js';

class FakeSession implements Session {
  readonly sent: SyncResponse[] = [];
  closed = '';
  closedAs = '';
  constructor(readonly nodeId: string) {}
  /** Until `hold` is cleared, the transport keeps full netmaps and calls back only on release(). */
  hold = false;
  private held: (() => void)[] = [];
  send(msg: Uint8Array, sent?: () => void) {
    this.sent.push(fromBinary(SyncResponseSchema, msg));
    if (this.hold && sent) this.held.push(sent);
    else sent?.();
  }
  release() {
    for (const f of this.held.splice(0)) f();
  }
  close(reason: string, why: string) {
    this.closed = reason;
    this.closedAs = why;
  }
}

describe('mapper fan-out', () => {
  let store: Store;
  let state: State;
  let mapper: Mapper;
  /** Small windows, everything in one slice, no budget to speak of, unless a test says otherwise. */
  const newMapper = (options: Partial<MapperOptions> = {}) => new Mapper(state, testMapperOptions(options));
  const ids: Record<string, string> = {};

  const register = async (name: string, tags: string[]) => {
    const node = await registerTestNode(state, { project: 'p', name, tags });
    ids[name] = node.id;
    return node;
  };

  before(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    mapper = newMapper();
    await state.createProject('test', 'p');
    await register('ops', ['tag:ops']);
    await register('fw', ['tag:firewall']);
    await register('m1', ['tag:machine']);
    await state.setPolicy(
      'test',
      'p',
      '{"tagOwners":{"tag:ops":[],"tag:firewall":[],"tag:machine":[]},"acls":[{"action":"accept","src":["tag:ops"],"dst":["tag:firewall:22"]}]}',
    );
    // Deliver the setup's changes before any session attaches.
    mapper.flush();
  });
  after(async () => {
    mapper.close();
    await store.close();
  });

  it('sends a change only to the sessions of nodes that see the changed node, coalesced', async () => {
    const sessions = Object.fromEntries(['ops', 'fw', 'm1'].map((n) => [n, new FakeSession(ids[n]!)]));
    for (const s of Object.values(sessions)) mapper.attach(s);
    assert.deepEqual(sessions.m1!.sent[0]!.full!.peers, [], 'm1 sees nobody');
    assert.deepEqual(
      sessions.ops!.sent[0]!.full!.peers.map((p) => p.name),
      ['fw'],
    );
    const before = Object.fromEntries(Object.entries(sessions).map(([n, s]) => [n, s.sent.length]));

    await state.updateEndpoints(ids.ops!, ['192.0.2.1:41641']);
    await state.updateEndpoints(ids.ops!, ['192.0.2.2:41641']);
    mapper.flush();
    assert.equal(sessions.fw!.sent.length, before.fw! + 1, 'fw gets one coalesced delta');
    const patch = sessions.fw!.sent.at(-1)!.peerPatches;
    assert.deepEqual(
      patch.map((p) => [p.id, p.endpoints]),
      [[ids.ops, ['192.0.2.2:41641']]],
    );
    assert.equal(sessions.m1!.sent.length, before.m1, 'm1 does not see ops and gets nothing');
    assert.equal(sessions.ops!.sent.length, before.ops, 'ops gets nothing about itself from a patch');
  });

  it('closes the stream of a deleted node and tells exactly its peers', async () => {
    const s = { ops: new FakeSession(ids.ops!), fw: new FakeSession(ids.fw!), m1: new FakeSession(ids.m1!) };
    for (const x of Object.values(s)) mapper.attach(x);
    await state.deleteNode('test', ids.fw!);
    mapper.flush();
    assert.match(s.fw.closed, /was deleted/);
    assert.equal(s.fw.closedAs, 'gone', 'a deleted node must register again');
    assert.deepEqual(s.ops.sent.at(-1)!.peersRemoved, [ids.fw]);
    assert.equal(s.m1.sent.length, 1, 'm1 never saw fw');
  });

  it('builds the full netmap from encoded pieces that follow every change of a peer', async () => {
    await register('fw2', ['tag:firewall']);
    mapper.flush();
    const ops = new FakeSession(ids.ops!);
    mapper.attach(ops);
    const first = ops.sent[0]!;
    assert.equal(first.seq, 1n);
    const map = first.full!;
    assert.equal(map.self?.name, 'ops');
    assert.equal(map.domain, 'p.mesh');
    assert.deepEqual(
      map.dns.map((r) => r.name),
      ['ops.p.mesh', ...map.peers.map((p) => `${p.name}.p.mesh`)],
      'own record first, then one per peer',
    );
    assert.ok(map.packetFilter, 'the packet filter is part of the full netmap');

    assert.deepEqual(
      map.peers.map((p) => p.name),
      ['fw2'],
    );
    const peer = map.peers[0]!;
    await state.updateEndpoints(peer.id, ['198.51.100.7:41641']);
    mapper.flush();
    const again = new FakeSession(ids.ops!);
    mapper.attach(again);
    assert.match(ops.closed, /replaced/);
    assert.equal(ops.closedAs, 'retry', 'a replaced stream is not an identity problem');
    assert.deepEqual(
      again.sent[0]!.full!.peers.find((p) => p.id === peer.id)?.endpoints,
      ['198.51.100.7:41641'],
      'a peer changed since it was last encoded is encoded again',
    );
    assert.equal(again.sent[0]!.seq, 1n, 'every stream numbers its own messages');
  });

  it('ends streams on shutdown so that agents retry', () => {
    const m = newMapper();
    const ops = new FakeSession(ids.ops!);
    m.attach(ops);
    m.close();
    assert.equal(ops.closedAs, 'retry');
    assert.match(ops.closed, /shutting down/);
  });

  it('holds presence-only batches for the presence window, and sends them with the next other change', async () => {
    const m = newMapper({ presenceMs: 10_000 });
    // The mapper's own timers and clock decide when a batch goes out: move them by hand.
    mock.timers.enable({ apis: ['setTimeout', 'Date'], now: Date.now() });
    try {
      const ops = new FakeSession(ids.ops!);
      m.attach(ops);
      state.setOnline(ids.fw2!, true);
      mock.timers.tick(9_999);
      assert.equal(ops.sent.length, 1, 'only the full netmap: presence waits');
      await state.updateEndpoints(ids.fw2!, ['198.51.100.9:41641']);
      mock.timers.tick(4);
      assert.equal(ops.sent.length, 1, 'nothing before the coalescing window ends');
      mock.timers.tick(1);
      assert.equal(ops.sent.length, 2, 'an endpoint change goes out when the coalescing window ends');
      assert.deepEqual(
        ops.sent[1]!.peerPatches.map((p) => [p.online, p.endpoints]),
        [[true, ['198.51.100.9:41641']]],
        'with the presence change that was waiting',
      );
    } finally {
      mock.timers.reset();
      m.close();
    }
  });

  it('holds presence-only batches longer in a project with many streams, and other changes not', async () => {
    // One presence window per stream here, where it is per 1,000 by default.
    const m = newMapper({ presenceMs: 1_000, presenceSessions: 1 });
    const other = await register('presence-other', ['tag:machine']);
    m.flush();
    mock.timers.enable({ apis: ['setTimeout', 'Date'], now: Date.now() });
    try {
      const ops = new FakeSession(ids.ops!);
      m.attach(ops);
      m.attach(new FakeSession(other.id));
      assert.equal(m.sessionCount, 2);
      state.setOnline(ids.fw2!, false);
      state.setOnline(ids.fw2!, true);
      mock.timers.tick(1_999);
      assert.equal(ops.sent.length, 1, 'two streams: presence waits two windows');
      mock.timers.tick(1);
      assert.equal(ops.sent.length, 2);
      assert.deepEqual(
        ops.sent[1]!.peerPatches.map((p) => p.online),
        [true],
      );
      await state.updateEndpoints(ids.fw2!, ['198.51.100.12:41641']);
      mock.timers.tick(5);
      assert.equal(ops.sent.length, 3, 'an endpoint change waits the coalescing window alone');
    } finally {
      mock.timers.reset();
      m.close();
      await state.deleteNode('test', other.id);
    }
  });

  it('does not hold a change back for a long flush that ended before a quiet spell', async () => {
    const quiet = await register('quiet', ['tag:firewall']);
    const m = newMapper({ coalesceMs: 5 });
    try {
      const ops = new FakeSession(ids.ops!);
      m.attach(ops);
      // One flush that takes 400 ms of CPU, like a large project's fan-out.
      const fast = slowSends(ops, 400);
      await state.updateEndpoints(quiet.id, ['198.51.100.10:41641']);
      m.flush();
      fast();
      const before = ops.sent.length;
      assert.equal(before, 2, 'the full netmap and the slow batch');
      // Quiet for longer than that flush took.
      await new Promise((r) => setTimeout(r, 600));
      const changed = performance.now();
      await state.updateEndpoints(quiet.id, ['198.51.100.11:41641']);
      while (ops.sent.length === before && performance.now() - changed < 5_000)
        await new Promise((r) => setTimeout(r, 1));
      const waited = performance.now() - changed;
      assert.equal(ops.sent.length, before + 1, 'the change was delivered');
      assert.ok(waited < 250, `the change waited ${waited.toFixed(0)} ms for a flush that ended 600 ms ago`);
    } finally {
      m.close();
      await state.deleteNode('test', quiet.id);
    }
  });

  it('sends a large batch in slices, letting the event loop run between them', async () => {
    const m = newMapper({ sliceMs: 0 });
    try {
      const sessions = ['ops', 'fw2', 'm1'].map((n) => new FakeSession(ids[n]!));
      for (const x of sessions) m.attach(x);
      await state.setPolicy('test', 'p', '');
      m.flush();
      const atOnce = sessions.filter((x) => x.sent.length > 1).length;
      assert.ok(atOnce < sessions.length, `all ${atOnce} sessions were served in one turn`);
      for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
      assert.deepEqual(
        sessions.map((x) =>
          x.sent
            .at(-1)!
            .peersChanged.map((p) => p.name)
            .sort(),
        ),
        [['m1'], ['m1'], ['fw2', 'ops']],
        'every session got the peers the removed policy had hidden',
      );
    } finally {
      m.close();
    }
  });

  it('sends full netmaps in turn when more are being sent than the budget allows', () => {
    const m = newMapper({ fullNetmapBudget: 1 });
    try {
      const [a, b, c] = ['ops', 'fw2', 'm1'].map((n) => new FakeSession(ids[n]!));
      a!.hold = true;
      b!.hold = true;
      for (const x of [a!, b!, c!]) m.attach(x);
      assert.deepEqual(
        [a, b, c].map((x) => x!.sent.length),
        [1, 0, 0],
        'the first full netmap fills the budget',
      );
      assert.ok(m.hasSession(ids.m1!), 'a waiting stream counts as connected');
      a!.release();
      assert.deepEqual(
        [a, b, c].map((x) => x!.sent.length),
        [1, 1, 0],
      );
      m.detach(b!);
      assert.deepEqual(
        [a, b, c].map((x) => x!.sent.length),
        [1, 1, 1],
        'a stream that ends gives its turn back',
      );
      assert.ok(c!.sent[0]!.full, 'and the next one starts with its full netmap');
    } finally {
      m.close();
    }
  });
});

describe('mapper fan-out across projects', () => {
  const TAGS = '"tagOwners":{"tag:ops":[],"tag:firewall":[]}';
  const sshOnly = `{${TAGS},"acls":[{"action":"accept","src":["tag:ops"],"dst":["tag:firewall:22"]}]}`;
  const sshAndHttps = `{${TAGS},"acls":[{"action":"accept","src":["tag:ops"],"dst":["tag:firewall:22,443"]}]}`;

  it('sends a policy change and a node change in one project to that project only', async () => {
    const store = await openStore({ url: ':memory:' });
    const state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    const mapper = new Mapper(state, testMapperOptions({ coalesceMs: 60_000, presenceMs: 60_000 }));
    try {
      const sessions: Record<string, FakeSession> = {};
      for (const project of ['a', 'b']) {
        await state.createProject('test', project);
        await state.setPolicy('test', project, sshOnly);
        for (const tag of ['ops', 'firewall']) {
          const { key } = await state.keys.createAuthKey('test', {
            project,
            reusable: false,
            ephemeral: false,
            expiresInMs: 60_000,
            tags: [`tag:${tag}`],
            reason: '',
          });
          const { node } = await state.register({
            authKey: key,
            machineKey: Buffer.from(generateMachineKey().publicKey).toString('hex'),
            nodeKey: encodeWgKey(generateNodeKey().publicKey),
            hostname: `${project}-${tag}`,
            os: 'linux',
            version: '1',
            requestedTags: [],
            endpoints: [],
            advertisedRoutes: [],
          });
          sessions[node.name] = new FakeSession(node.id);
        }
      }
      mapper.flush();
      for (const x of Object.values(sessions)) mapper.attach(x);
      const ports = (x: FakeSession) =>
        x.sent
          .flatMap((m) => (m.full?.packetFilter ?? m.packetFilter)?.rules ?? [])
          .flatMap((r) => r.ports.map((p) => p.first));
      assert.deepEqual(ports(sessions['b-firewall']!), [22]);

      await state.setPolicy('test', 'a', sshAndHttps);
      await state.updateEndpoints(sessions['a-ops']!.nodeId, ['192.0.2.5:41641']);
      mapper.flush();
      assert.deepEqual(ports(sessions['a-firewall']!), [22, 22, 443], 'a-firewall gets its new filter');
      assert.equal(sessions['a-firewall']!.sent.at(-1)!.peerPatches.length, 1, 'and the endpoint change');
      for (const name of ['b-ops', 'b-firewall']) {
        assert.equal(sessions[name]!.sent.length, 1, `${name} gets nothing beyond its full netmap`);
      }
      assert.deepEqual(ports(sessions['b-firewall']!), [22], "b-firewall's filter is untouched");
    } finally {
      mapper.close();
      await store.close();
    }
  });
});

describe('messages spliced from encoded pieces', () => {
  it('decode like the same message encoded whole, also with lengths of several bytes', () => {
    const peers = Array.from({ length: 3 }, (_, i) =>
      create(PeerSchema, {
        id: `peer-${i}`,
        name: 'x'.repeat(i * 9000),
        endpoints: [`192.0.2.${i}:41641`],
      }),
    );
    const rule = {
      srcCidrs: ['100.64.0.1/32'],
      dstCidrs: [],
      ports: [{ first: 22, last: 22 }],
      protocols: [],
    };
    const bytes = assemble([
      seqField(300n),
      {
        field: SyncResponseSchema.field.packetFilter.number,
        message: filterPieces([{ ...rule, protocols: ['tcp'] }]),
      },
      {
        field: SyncResponseSchema.field.peersChanged.number,
        elements: peers.map((p) => toBinary(PeerSchema, p)),
      },
      { field: SyncResponseSchema.field.peersRemoved.number, elements: [Buffer.from('gone')] },
    ]);
    const whole = create(SyncResponseSchema, {
      seq: 300n,
      packetFilter: { rules: [{ ...rule, protocols: [Protocol.TCP] }] },
      peersChanged: peers,
      peersRemoved: ['gone'],
    });
    assert.ok(equals(SyncResponseSchema, fromBinary(SyncResponseSchema, bytes), whole));
    assert.equal(bytes.length, toBinary(SyncResponseSchema, whole).length);
  });
});
