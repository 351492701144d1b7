// The mapper's bookkeeping of streams and batches, read from what agents
// receive: how many full netmaps go out at once, streams replaced or ended
// while they wait for theirs, when a batch goes out (another project's
// waiting batch, the pause after a long flush), what a presence patch and a
// node's own change say, who gets nothing, and the delivery callback.
import assert from 'node:assert/strict';
import { after, before, describe, it, mock } from 'node:test';
import { Mapper, type MapperOptions } from '../../coordinator/mapper/mapper.js';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { RecordingSession, slowSends, testMapperOptions, withMockedClock } from '../fixtures/mapper.js';
import { registerTestNode } from '../fixtures/nodes.js';

const POLICY = {
  tagOwners: { 'tag:ops': [], 'tag:firewall': [], 'tag:machine': [] },
  acls: [{ action: 'accept', src: ['tag:ops'], dst: ['tag:firewall:22'] }],
};

describe('mapper streams and batches', () => {
  let store: Store;
  let state: State;
  const ids: Record<string, string> = {};
  const mappers: Mapper[] = [];
  const newMapper = (options: Partial<MapperOptions> = {}) => {
    const m = new Mapper(state, testMapperOptions(options));
    mappers.push(m);
    return m;
  };
  const register = async (project: string, name: string, tags: string[] = []) => {
    ids[name] = (await registerTestNode(state, { project, name, tags })).id;
    return ids[name]!;
  };
  const stream = (name: string, options: { held?: boolean } = {}) =>
    new RecordingSession(ids[name]!, options);
  const counts = (...streams: RecordingSession[]) => streams.map((s) => s.sent.length);
  /** Waits for `cond`, failing after 5 s (of a clock that tests do not mock). */
  const until = async (what: string, cond: () => boolean) => {
    const end = performance.now() + 5000;
    while (!cond()) {
      if (performance.now() > end) assert.fail(`never happened: ${what}`);
      await new Promise((r) => setTimeout(r, 1));
    }
  };

  before(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    await state.createProject('test', 'p');
    await state.createProject('test', 'q');
    await register('p', 'ops', ['tag:ops']);
    await register('p', 'fw', ['tag:firewall']);
    await register('p', 'm1', ['tag:machine']);
    await register('q', 'q1');
    await register('q', 'q2');
    await state.setPolicy('test', 'p', JSON.stringify(POLICY));
  });
  after(async () => {
    for (const m of mappers) m.close();
    await store.close();
  });

  it('sends as many full netmaps at once as the budget holds, to the byte', () => {
    const probe = newMapper();
    const first = stream('fw', { held: true });
    probe.attach(first);
    const size = first.bytes[0]!;

    const exact = newMapper({ fullNetmapBudget: size });
    const [a, b] = [stream('fw', { held: true }), stream('ops')];
    exact.attach(a);
    exact.attach(b);
    assert.deepEqual(counts(a, b), [1, 0], 'a netmap of exactly the budget fills it');
    assert.equal(exact.sessionCount, 2, 'the waiting stream counts');
    a.release();
    assert.deepEqual(counts(a, b), [1, 1]);

    const roomy = newMapper({ fullNetmapBudget: 10 * size });
    const [c, d] = [stream('fw', { held: true }), stream('ops')];
    roomy.attach(c);
    roomy.attach(d);
    assert.deepEqual(counts(c, d), [1, 1], 'a netmap under way does not hold back one that fits beside it');

    const none = newMapper({ fullNetmapBudget: 0 });
    const [e, f] = [stream('fw', { held: true }), stream('ops')];
    none.attach(e);
    none.attach(f);
    assert.deepEqual(counts(e, f), [1, 0], 'without a budget, one at a time');
    e.release();
    assert.deepEqual(counts(e, f), [1, 1]);
  });

  /**
   * A project of two nodes whose streams are open on a mapper with `deltaBudget`
   * (the first stream held as `held` says), and a third node that joins it: the
   * flush of that change is under way when this returns.
   */
  const flushToTwo = async (project: string, deltaBudget: number, held: [boolean, boolean]) => {
    await state.createProject('test', project);
    await register(project, `${project}1`);
    await register(project, `${project}2`);
    const m = newMapper({ deltaBudget });
    const streams = [
      stream(`${project}1`, { held: held[0] }),
      stream(`${project}2`, { held: held[1] }),
    ] as const;
    for (const s of streams) m.attach(s);
    assert.deepEqual(counts(...streams), [1, 1], 'full netmaps have a budget of their own');
    await register(project, `${project}3`);
    m.flush();
    return { m, streams };
  };
  const turn = () => new Promise((resolve) => setImmediate(resolve));

  it('holds a flush while the deltas handed out fill their budget, and goes on as the transports take them', async () => {
    // Without a budget, one delta at a time.
    const {
      m,
      streams: [h1, h2],
    } = await flushToTwo('held', 0, [true, true]);
    assert.deepEqual(counts(h1, h2), [2, 1], "the first stream's delta fills the budget");
    assert.equal(m.idle, false, 'the flush waits');
    assert.deepEqual(m.unsent, { full: h1.bytes[0]! + h2.bytes[0]!, deltas: h1.bytes[1]! });
    h1.release();
    await turn();
    assert.deepEqual(counts(h1, h2), [2, 2], 'the flush goes on as soon as the delta is taken');
    assert.deepEqual(m.unsent, { full: h2.bytes[0]!, deltas: h2.bytes[1]! });
    h2.release();
    await turn();
    assert.equal(m.idle, true);
    assert.deepEqual(m.unsent, { full: 0, deltas: 0 });
    for (const s of [h1, h2]) assert.ok(s.map!.peers.some((p) => p.name === 'held3'));
    await register('held', 'held4');
    await until('the next change after a flush that waited', () =>
      [h1, h2].every((s) => s.map!.peers.some((p) => p.name === 'held4')),
    );
  });

  it('sends every delta at once that fits in the budget beside the others', async () => {
    const {
      m,
      streams: [r1, r2],
    } = await flushToTwo('roomy', 10_000, [true, true]);
    assert.deepEqual(counts(r1, r2), [2, 2]);
    assert.equal(m.idle, true);
    assert.equal(m.unsent.deltas, r1.bytes[1]! + r2.bytes[1]!);
  });

  it('goes on with a held flush as soon as the stream that holds it ends', async () => {
    const {
      m,
      streams: [e1, e2],
    } = await flushToTwo('ends', 1, [true, false]);
    assert.deepEqual(counts(e1, e2), [2, 1]);
    m.detach(e1);
    assert.deepEqual(m.unsent, { full: 0, deltas: 0 }, 'what it held is no longer counted');
    await turn();
    assert.equal(e2.sent.length, 2);
  });

  it('stops counting the deltas of a stream that takes nothing for a second', async () => {
    const {
      m,
      streams: [stuck, other],
    } = await flushToTwo('stuck', 1, [true, false]);
    assert.deepEqual(counts(stuck, other), [2, 1], "the stuck stream's delta fills the budget");
    await until('the other stream gets its delta', () => other.sent.length === 2);
    assert.ok(other.map!.peers.some((p) => p.name === 'stuck3'));
    assert.deepEqual(
      m.unsent,
      { full: stuck.bytes[0]!, deltas: 0 },
      'its delta no longer counts, its netmap does',
    );
    stuck.release();
    assert.deepEqual(m.unsent, { full: 0, deltas: 0 }, 'taking it late does not count it off twice');
  });

  it('closes a stream that has not taken a message for the stall time, and frees the budget it held', () =>
    withMockedClock(() => {
      const m = newMapper({ keepaliveMs: 1000, stallMs: 5000, fullNetmapBudget: 1 });
      const [stuck, waiting] = [stream('fw', { held: true }), stream('ops')];
      m.attach(stuck);
      m.attach(waiting);
      mock.timers.tick(4000);
      assert.equal(stuck.closed, '', 'not yet: its netmap was handed over 4 s ago');
      assert.equal(waiting.sent.length, 0, 'the stuck netmap fills the budget');
      mock.timers.tick(1000);
      assert.equal(stuck.closed, 'the agent has not read its stream for 5 s');
      assert.equal(stuck.closedAs, 'retry', 'its agent opens the stream again');
      assert.equal(m.hasSession(ids.fw!), false);
      assert.equal(waiting.sent.length, 1, 'the waiting stream has its turn');
      assert.deepEqual(m.unsent, { full: 0, deltas: 0 });
      assert.ok(waiting.sent[0]!.full);
    }));

  it('delivers a change when the wall clock is set back an hour after it came', async () => {
    const m = newMapper({ clock: undefined });
    const s = stream('q1');
    m.attach(s);
    await register('q', 'q-late');
    mock.timers.enable({ apis: ['Date'], now: Date.now() - 3_600_000 });
    try {
      await until('the change arrives', () => s.map!.peers.some((p) => p.name === 'q-late'));
    } finally {
      mock.timers.reset();
    }
  });

  it('keeps a stream that took its messages late: the stall time runs from the oldest message not taken', () =>
    withMockedClock(() => {
      const m = newMapper({ keepaliveMs: 1000, stallMs: 5000 });
      const late = stream('fw', { held: true });
      m.attach(late);
      mock.timers.tick(4000);
      late.release();
      mock.timers.tick(4000);
      assert.equal(late.closed, '', 'open 8 s, its last message taken at once');
      assert.equal(m.hasSession(ids.fw!), true);
      assert.ok(late.sent.length > 2, 'keepalives go on');
    }));

  it('a stream waiting for its netmap and replaced gets nothing, its successor everything', () => {
    const m = newMapper({ fullNetmapBudget: 1 });
    const blocker = stream('fw', { held: true });
    m.attach(blocker);
    const [old, newer] = [stream('ops'), stream('ops')];
    m.attach(old);
    m.attach(newer);
    assert.equal(old.closed, 'replaced by a newer stream of the same node');
    assert.equal(old.closedAs, 'retry', 'its agent opens the stream again, it does not register');
    // The old stream's end, reported after its replacement, must not take the new one's turn.
    m.detach(old);
    blocker.release();
    assert.deepEqual(counts(old, newer), [0, 1]);
    assert.ok(newer.sent[0]!.full);
  });

  it('a stream that ends while waiting gets nothing, and a node deleted meanwhile is told to register again', async () => {
    const m = newMapper({ fullNetmapBudget: 1 });
    const blocker = stream('fw', { held: true });
    m.attach(blocker);
    const gone = stream('ops');
    await register('p', 'doomed', ['tag:machine']);
    const doomed = stream('doomed');
    m.attach(gone);
    m.attach(doomed);
    m.detach(gone);
    await state.deleteNode('test', ids.doomed!, 'p');
    blocker.release();
    assert.deepEqual(counts(gone, doomed), [0, 0]);
    assert.equal(doomed.closed, 'node does not exist');
    assert.equal(doomed.closedAs, 'gone', 'its agent must register again');
    assert.equal(m.hasSession(ids.doomed!), false);
  });

  it('closes the stream of a node that does not exist at once, even while others wait their turn', () => {
    const m = newMapper({ fullNetmapBudget: 1 });
    const blocker = stream('fw', { held: true });
    m.attach(blocker);
    const stranger = new RecordingSession('no-such-node');
    m.attach(stranger);
    assert.equal(stranger.closed, 'node does not exist');
    assert.equal(stranger.closedAs, 'gone');
    assert.equal(m.hasSession('no-such-node'), false);
    blocker.release();
  });

  it('the end of a replaced stream leaves its successor connected', async () => {
    const m = newMapper();
    const [old, newer, fw] = [stream('ops'), stream('ops'), stream('fw')];
    m.attach(fw);
    m.attach(old);
    m.attach(newer);
    m.detach(old);
    assert.equal(m.hasSession(ids.ops!), true);
    await state.renameNode('test', ids.fw!, 'p', 'fw-renamed');
    m.flush();
    assert.deepEqual(
      newer.map?.peers.map((p) => p.name),
      ['fw-renamed'],
    );
    await state.renameNode('test', ids.fw!, 'p', 'fw');
  });

  it("does not hold a change back for another project's batch that waits longer", async () => {
    const m = newMapper({ coalesceMs: 5, presenceMs: 10_000 });
    const [ops, q1] = [stream('ops'), stream('q1')];
    m.attach(ops);
    m.attach(q1);
    mock.timers.enable({ apis: ['setTimeout', 'Date'], now: Date.now() });
    try {
      state.setOnline(ids.q2!, true);
      await state.renameNode('test', ids.fw!, 'p', 'fw-moved');
      mock.timers.tick(4);
      assert.deepEqual(counts(ops, q1), [1, 1], 'nothing before the coalescing window ends');
      mock.timers.tick(1);
      assert.deepEqual(counts(ops, q1), [2, 1], "the rename goes out; q's presence waits for its window");
      mock.timers.tick(10_000);
      assert.deepEqual(counts(ops, q1), [2, 2], "q's presence goes out at the end of its window");
      assert.equal(q1.sent[1]!.peerPatches[0]?.online, true);
    } finally {
      mock.timers.reset();
      state.setOnline(ids.q2!, false);
      await state.renameNode('test', ids.fw!, 'p', 'fw');
    }
  });

  it('after a flush that took long, the next change waits about as long', async () => {
    const m = newMapper({ coalesceMs: 5 });
    const ops = stream('ops');
    m.attach(ops);
    const fast = slowSends(ops, 300);
    await state.updateEndpoints(ids.fw!, ['198.51.100.20:41641']);
    m.flush();
    fast();
    assert.equal(ops.sent.length, 2, 'the full netmap and the slow batch');
    const changed = performance.now();
    await state.updateEndpoints(ids.fw!, ['198.51.100.21:41641']);
    await until('the second change', () => ops.sent.length === 3);
    const waited = performance.now() - changed;
    assert.ok(waited >= 200, `the change went out after ${waited.toFixed(0)} ms, not after the 300 ms flush`);
  });

  it('tells presence alone as a patch without endpoints, and a changed peer without a patch', async () => {
    const m = newMapper();
    const ops = stream('ops');
    m.attach(ops);
    state.setOnline(ids.fw!, true);
    m.flush();
    const patch = ops.sent[1]!.peerPatches;
    assert.deepEqual(
      patch.map((p) => [p.id, p.online, p.endpointsChanged, p.endpoints]),
      [[ids.fw, true, false, []]],
    );
    assert.ok(patch[0]!.lastSeen, 'with the time it was last seen');
    state.setOnline(ids.fw!, false);
    await state.renameNode('test', ids.fw!, 'p', 'fw-2');
    m.flush();
    const both = ops.sent[2]!;
    assert.deepEqual(
      both.peersChanged.map((p) => [p.name, p.online]),
      [['fw-2', false]],
      'the changed peer carries its presence',
    );
    assert.deepEqual(both.peerPatches, [], 'and no patch beside it');
    await state.renameNode('test', ids.fw!, 'p', 'fw');
  });

  it('sends nothing to a node whose view a change leaves as it is, not even its own node', async () => {
    const m = newMapper();
    const [ops, fw, m1] = [stream('ops'), stream('fw'), stream('m1')];
    for (const s of [ops, fw, m1]) m.attach(s);
    await state.setPolicy(
      'test',
      'p',
      JSON.stringify({
        ...POLICY,
        acls: [...POLICY.acls, { action: 'accept', src: ['tag:machine'], dst: ['tag:machine:80'] }],
      }),
    );
    m.flush();
    assert.deepEqual(counts(ops, fw), [1, 1], 'a rule between machines says nothing to ops and fw');
    await state.renameNode('test', ids.ops!, 'p', 'ops-2');
    m.flush();
    assert.equal(fw.sent.length, 2);
    assert.equal(fw.sent[1]!.self, undefined, "a peer's rename does not resend fw's own node");
    assert.ok(ops.sent[1]!.self, 'the renamed node gets its own');
    await state.renameNode('test', ids.ops!, 'p', 'ops');
    await state.setPolicy('test', 'p', JSON.stringify(POLICY));
  });

  it('gives a firewall the address of a new node that may reach it, in its packet filter, and takes a deleted one out', async () => {
    const m = newMapper();
    const fw = stream('fw');
    m.attach(fw);
    const id = await register('p', 'ops-new', ['tag:ops']);
    m.flush();
    const address = state.getNode(id)!.ipv4;
    const letsIn = () =>
      (fw.map!.packetFilter?.rules ?? []).some((r) => r.srcCidrs.some((c) => c.startsWith(`${address}/`)));
    assert.ok(letsIn(), `fw's filter lets ${address} in`);
    await state.deleteNode('test', id, 'p');
    m.flush();
    assert.ok(!letsIn(), `deleted, ${address} is out of fw's filter`);
  });

  it('lets a flush pass a node that expired without a stream', async () => {
    const m = newMapper();
    const ops = stream('ops');
    m.attach(ops);
    const id = await register('p', 'fw-old', ['tag:firewall']);
    m.flush();
    await state.expireNode('test', id, 'p', Date.now() - 1000);
    m.flush();
    assert.ok(ops.sent.length >= 2, 'ops heard of the expiry');
    await state.deleteNode('test', id, 'p');
  });

  it('patches a node never seen with no last-seen time', async () => {
    // A row with no last_seen, as a node that never connected has in a database of an older release.
    await store.db.updateTable('nodes').set({ last_seen: null }).where('id', '=', ids.fw!).execute();
    const loaded = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    const m = new Mapper(loaded, testMapperOptions());
    try {
      const ops = stream('ops');
      m.attach(ops);
      loaded.setObservedEndpoint(ids.fw!, '198.51.100.7:41641');
      m.flush();
      const [patch] = ops.sent.at(-1)!.peerPatches;
      assert.ok(patch!.endpoints.includes('198.51.100.7:41641'));
      assert.equal(patch!.lastSeen, undefined, 'not 1970');
    } finally {
      m.close();
      await loaded.close();
    }
  });

  it('tells a node that its desired version was withdrawn with an empty one', async () => {
    const m = newMapper();
    const fw = stream('fw');
    m.attach(fw);
    state.setOnline(ids.fw!, true);
    await state.setDesiredVersion('test', 'p', 'tag:firewall', '2.0.0');
    m.flush();
    assert.equal(fw.sent.at(-1)!.desiredVersion, '2.0.0');
    await state.setDesiredVersion('test', 'p', 'tag:firewall', '');
    m.flush();
    assert.equal(fw.sent.at(-1)!.desiredVersion, '', 'no version: stay on the running one');
    state.setOnline(ids.fw!, false);
  });

  it('reports each delivered batch with its age and recipients, and presence alone never', async () => {
    const delivered: [number, number][] = [];
    const m = newMapper({ onDelivered: (ms, sessions) => delivered.push([ms, sessions]) });
    const [ops, fw] = [stream('ops'), stream('fw')];
    m.attach(ops);
    m.attach(fw);
    state.setOnline(ids.fw!, true);
    m.flush();
    assert.equal(ops.sent.length, 2, 'ops got the presence patch');
    assert.equal(delivered.length, 0, 'presence alone is not reported');
    await state.renameNode('test', ids.fw!, 'p', 'fw-3');
    m.flush();
    assert.equal(delivered.length, 1);
    const [ms, sessions] = delivered[0]!;
    assert.equal(sessions, 2, 'fw and ops');
    assert.ok(ms >= 0 && ms < 5000, `age ${ms} ms`);
    state.setOnline(ids.fw!, false);
    await state.renameNode('test', ids.fw!, 'p', 'fw');
  });
});

describe('mapper: a full netmap instead of a delta', () => {
  let store: Store;
  let state: State;
  let mapper: Mapper;
  let viewer: RecordingSession;
  const k: string[] = [];
  const tagOwners = { 'tag:v': [], 'tag:t': [], 'tag:u': [], 'tag:k': [] };
  const policy = (...dst: string[]) =>
    JSON.stringify({
      tagOwners,
      acls: dst.length
        ? [{ action: 'accept', src: ['tag:v'], dst: dst.map((d) => `${d}:22`) }]
        : [{ action: 'accept', src: ['tag:k'], dst: ['tag:k:22'] }],
    });
  /** Sets the policy and returns the viewer's message about it. */
  const change = async (...dst: string[]) => {
    await state.setPolicy('test', 'w', policy(...dst));
    const before = viewer.sent.length;
    mapper.flush();
    assert.equal(viewer.sent.length, before + 1);
    return viewer.sent.at(-1)!;
  };

  before(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    await state.createProject('test', 'w');
    await state.setPolicy('test', 'w', policy());
    const v = await registerTestNode(state, { project: 'w', name: 'viewer', tags: ['tag:v'] });
    // 64 targets, 63 of them also tag:u, and 20 others.
    for (let i = 1; i <= 64; i++)
      await registerTestNode(state, {
        project: 'w',
        name: `t${i}`,
        tags: i < 64 ? ['tag:t', 'tag:u'] : ['tag:t'],
      });
    for (let i = 1; i <= 20; i++)
      k.push((await registerTestNode(state, { project: 'w', name: `k${i}`, tags: ['tag:k'] })).id);
    mapper = new Mapper(state, testMapperOptions());
    viewer = new RecordingSession(v.id);
    mapper.attach(viewer);
  });
  after(async () => {
    mapper.close();
    await store.close();
  });

  it('when a policy change hides 64 peers and leaves none', async () => {
    await change('tag:t');
    assert.equal(viewer.map!.peers.length, 64);
    const msg = await change();
    assert.ok(msg.full, 'the full netmap, smaller than 64 removals');
    assert.equal(viewer.map!.peers.length, 0);
  });

  it('never for fewer than 64 removals, even when it would be smaller', async () => {
    await change('tag:u');
    assert.equal(viewer.map!.peers.length, 63);
    const msg = await change();
    assert.equal(msg.full, undefined);
    assert.equal(msg.peersRemoved.length, 63);
  });

  it('not when the peers that stay make it the larger', async () => {
    await change('tag:t', 'tag:k');
    assert.equal(viewer.map!.peers.length, 84);
    const msg = await change('tag:k');
    assert.equal(msg.full, undefined, '64 removals weigh less than 20 peers');
    assert.equal(msg.peersRemoved.length, 64);
    assert.equal(viewer.map!.peers.length, 20);
  });

  it('sends the peers that changed since the group was compressed beside it, in the implied form, never the node itself', async () => {
    await state.setPolicy('test', 'w', policy());
    mapper.flush();
    const shared = { implied: true, shared: true };
    mapper.attach(new RecordingSession(k[0]!, shared));
    await state.updateEndpoints(k[1]!, ['198.51.100.30:41641']);
    mapper.flush();
    const late = new RecordingSession(k[0]!, shared);
    mapper.attach(late);
    const full = late.sent[0]!.full!;
    assert.ok(full.sharedPeers.length > 0, 'the group block');
    assert.deepEqual(
      full.peers.map((p) => [p.name, p.allowedIps]),
      [['k2', []]],
      'k2 changed since the block was made: it goes beside it, without what the agent reconstructs',
    );
    assert.deepEqual(late.map!.peers.find((p) => p.name === 'k2')?.endpoints, ['198.51.100.30:41641']);

    const fresh = new Mapper(state, testMapperOptions());
    try {
      // Another stream of the project keeps its blocks while k3's is replaced.
      fresh.attach(new RecordingSession(k[3]!, shared));
      fresh.attach(new RecordingSession(k[2]!, shared));
      await state.updateEndpoints(k[2]!, ['198.51.100.31:41641']);
      fresh.flush();
      const own = new RecordingSession(k[2]!, shared);
      fresh.attach(own);
      assert.deepEqual(own.sent[0]!.full!.peers, [], 'k3 changed since, but is no peer of its own');
    } finally {
      fresh.close();
    }
  });
});

describe('mapper: a large delta to a stream that takes shared peers', () => {
  let store: Store;
  let state: State;
  const names: string[] = [];

  before(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    await state.createProject('test', 'big');
    // Sixteen endpoints each make a peer weigh about 450 bytes on its own,
    // where the group's block takes about 65 bytes per peer.
    const endpoints = (i: number) =>
      Array.from({ length: 16 }, (_, j) => `[2001:db8:${i.toString(16)}::${j + 1}]:41641`);
    for (let i = 0; i < 300; i++) {
      names.push(`n${i}`);
      await registerTestNode(state, { project: 'big', name: `n${i}`, tags: [], endpoints: endpoints(i) });
    }
  });
  after(async () => {
    await store.close();
  });

  it('stays a delta when the full netmap would weigh more, past the size that has it compared', async () => {
    const m = new Mapper(state, testMapperOptions({ coalesceMs: 60_000 }));
    try {
      const viewer = new RecordingSession(state.resolveNode('n0', 'big').id, { implied: true, shared: true });
      m.attach(viewer);
      for (const name of names.slice(1, 51)) await state.renameNode('test', name, 'big', `${name}-renamed`);
      m.flush();
      const got = viewer.sent.at(-1)!;
      assert.ok(
        viewer.bytes.at(-1)! > 16 * 1024,
        `a delta of ${viewer.bytes.at(-1)} bytes is compared with the full netmap`,
      );
      assert.equal(got.full, undefined);
      assert.equal(got.peersChanged.length, 50);
      assert.equal(viewer.map!.peers.filter((p) => p.name.endsWith('-renamed')).length, 50);
    } finally {
      m.close();
    }
  });
});
