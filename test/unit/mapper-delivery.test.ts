// Who receives what from the mapper after which change, read from the messages its sessions get:
// a new node, a rename, a tag change that hides a node, an expiry, a desired version, keepalives,
// streams of unknown or detached nodes, and the delivery callback. Never anything in another
// project.
import assert from 'node:assert/strict';
import { after, before, beforeEach, describe, it, mock } from 'node:test';
import { fromBinary } from '@bufbuild/protobuf';
import { Mapper, type MapperOptions, type Session } from '../../coordinator/mapper/mapper.js';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { type SyncResponse, SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import { testMapperOptions, withMockedClock } from '../fixtures/mapper.js';
import { registerTestNode } from '../fixtures/nodes.js';

class Stream implements Session {
  readonly sent: SyncResponse[] = [];
  closed = '';
  closedAs = '';
  constructor(readonly nodeId: string) {}
  send(msg: Uint8Array, sent?: () => void) {
    this.sent.push(fromBinary(SyncResponseSchema, msg));
    sent?.();
  }
  close(reason: string, why: string) {
    this.closed = reason;
    this.closedAs = why;
  }
  /** What arrived since the last call. */
  private seen = 0;
  fresh(): SyncResponse[] {
    const out = this.sent.slice(this.seen);
    this.seen = this.sent.length;
    return out;
  }
}

const POLICY = JSON.stringify({
  tagOwners: { 'tag:ops': [], 'tag:firewall': [], 'tag:machine': [] },
  acls: [{ action: 'accept', src: ['tag:ops'], dst: ['tag:firewall:22'] }],
});

describe('mapper delivery', () => {
  let store: Store;
  let state: State;
  let mapper: Mapper;
  const delivered: [number, number][] = [];
  const id: Record<string, string> = {};
  const streams: Record<string, Stream> = {};
  const options: MapperOptions = testMapperOptions({
    coalesceMs: 60_000,
    presenceMs: 60_000,
    onDelivered: (ms, sessions) => delivered.push([ms, sessions]),
  });
  const names = (peers: { name: string }[]) => peers.map((p) => p.name).sort();

  before(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    mapper = new Mapper(state, options);
    for (const project of ['a', 'b']) await state.createProject('test', project);
    await state.setPolicy('test', 'a', POLICY);
    for (const [project, name, tag] of [
      ['a', 'ops', 'tag:ops'],
      ['a', 'fw', 'tag:firewall'],
      ['a', 'm1', 'tag:machine'],
      ['b', 'b1', 'tag:ops'],
      ['b', 'b2', 'tag:ops'],
    ] as const) {
      id[name] = (await registerTestNode(state, { project, name, tags: [tag] })).id;
    }
    mapper.flush();
    for (const name of Object.keys(id)) {
      streams[name] = new Stream(id[name]!);
      mapper.attach(streams[name]!);
    }
  });
  after(async () => {
    mapper.close();
    await store.close();
  });
  beforeEach(() => {
    for (const s of Object.values(streams)) s.fresh();
    delivered.length = 0;
  });

  /** Sends what is pending and returns what each stream got. */
  const flush = (): Record<string, SyncResponse[]> => {
    mapper.flush();
    return Object.fromEntries(Object.entries(streams).map(([n, s]) => [n, s.fresh()]));
  };
  const quiet = (got: Record<string, SyncResponse[]>, ...who: string[]) => {
    for (const n of who) assert.deepEqual(got[n], [], `${n} gets nothing`);
  };

  it('starts every stream with its full netmap, numbered 1', () => {
    assert.deepEqual(names(streams.ops!.sent[0]!.full!.peers), ['fw']);
    assert.deepEqual(names(streams.fw!.sent[0]!.full!.peers), ['ops']);
    assert.deepEqual(names(streams.m1!.sent[0]!.full!.peers), []);
    assert.deepEqual(names(streams.b1!.sent[0]!.full!.peers), ['b2']);
    for (const s of Object.values(streams)) assert.equal(s.sent[0]!.seq, 1n);
    assert.equal(mapper.sessionCount, 5);
  });

  it('refuses a stream of a node that does not exist, as one that must register again', () => {
    const ghost = new Stream('no-such-node');
    mapper.attach(ghost);
    assert.deepEqual([ghost.closed, ghost.closedAs, ghost.sent.length], ['node does not exist', 'gone', 0]);
    assert.equal(mapper.hasSession('no-such-node'), false);
    assert.equal(mapper.sessionCount, 5);
  });

  it('tells a new node to the peers that see it, and nobody else', async () => {
    id.fw2 = (await registerTestNode(state, { project: 'a', name: 'fw2', tags: ['tag:firewall'] })).id;
    const got = flush();
    assert.equal(got.ops!.length, 1);
    assert.deepEqual(names(got.ops![0]!.peersChanged), ['fw2']);
    assert.equal(got.ops![0]!.seq, 2n, 'the next number of the stream');
    quiet(got, 'fw', 'm1', 'b1', 'b2');
    assert.equal(delivered.length, 1, 'one delivery reported');
    assert.equal(delivered[0]![1], 1, 'to one session');
    assert.ok(delivered[0]![0] >= 0);
    streams.fw2 = new Stream(id.fw2!);
    mapper.attach(streams.fw2);
    assert.deepEqual(names(streams.fw2.fresh()[0]!.full!.peers), ['ops']);
  });

  it('sends a rename to the node itself and to its peers', async () => {
    await state.renameNode('test', id.fw!, 'a', 'fw-renamed');
    const got = flush();
    assert.equal(got.fw![0]!.self?.name, 'fw-renamed', 'the node learns its new name');
    assert.deepEqual(names(got.ops![0]!.peersChanged), ['fw-renamed']);
    quiet(got, 'm1', 'b1', 'b2');
  });

  it('removes a node that a tag change hides from its former peers, and gives them their new filter', async () => {
    await state.setNodeTags('test', id.fw!, 'a', ['tag:machine']);
    const got = flush();
    const ops = got.ops![0]!;
    assert.deepEqual(ops.peersRemoved, [id.fw]);
    const fw = got.fw![0]!;
    assert.deepEqual(fw.peersRemoved, [id.ops], 'fw no longer sees ops either');
    assert.deepEqual(fw.packetFilter?.rules ?? [], [], 'and nothing reaches it any more');
    assert.deepEqual(fw.self?.tags, ['tag:machine']);
    quiet(got, 'm1', 'b1', 'b2');
  });

  it('delivers a desired version to the nodes it names, in their project only', async () => {
    const release = {
      artifactUrl: 'https://releases.example/meshgate-2.0.0.tar.gz',
      sha256: 'c'.repeat(64),
      allowDowngrade: false,
      maxUnavailable: 10,
    };
    // A rollout releases a version to nodes that are online.
    for (const n of ['fw2', 'b1']) state.setOnline(id[n]!, true);
    flush();
    await state.setDesiredVersion('test', 'a', 'tag:firewall', '2.0.0', release);
    const got = flush();
    assert.equal(got.fw2![0]?.desiredVersion, '2.0.0');
    quiet(got, 'ops', 'fw', 'm1', 'b1', 'b2');
    await state.setDesiredVersion('test', 'b', '', '2.0.0', release);
    const again = flush();
    assert.equal(again.b1![0]?.desiredVersion, '2.0.0');
    quiet(again, 'ops', 'fw', 'fw2', 'm1');
  });

  it("closes an expired node's stream as gone and takes it from its peers", async () => {
    await state.expireNode('test', id.fw2!, 'a', Date.now());
    const got = flush();
    assert.equal(streams.fw2!.closedAs, 'gone');
    assert.match(streams.fw2!.closed, /has expired/);
    assert.deepEqual(got.ops![0]!.peersRemoved, [id.fw2]);
    quiet(got, 'm1', 'b1', 'b2');
  });

  it('sends a detached stream nothing more', async () => {
    mapper.detach(streams.b2!);
    assert.equal(mapper.hasSession(id.b2!), false);
    await state.updateEndpoints(id.b1!, ['192.0.2.7:41641']);
    const got = flush();
    quiet(got, 'b2', 'ops', 'fw', 'm1');
  });

  /** Ops's stream on a mapper with `keepaliveMs`, the interval and the clock mocked, given to `check`. */
  const withKeepalive = (keepaliveMs: number, check: (s: Stream) => void) =>
    withMockedClock(() => {
      const m = new Mapper(state, { ...options, keepaliveMs });
      try {
        const s = new Stream(id.ops!);
        m.attach(s);
        check(s);
      } finally {
        m.close();
      }
    });

  it('looks for quiet streams at most once a second, however short the keepalive time', () =>
    withKeepalive(100, (s) => {
      mock.timers.tick(900);
      assert.equal(s.sent.length, 1, 'quiet for 900 ms, and not yet looked at');
      mock.timers.tick(100);
      assert.equal(s.sent.length, 2);
      assert.equal(s.sent[1]!.keepalive, true);
    }));

  it('sends a keepalive to a stream that got nothing for the keepalive time', () =>
    withKeepalive(10_000, (s) => {
      mock.timers.tick(5_000);
      assert.equal(s.sent.length, 1, 'not before the keepalive time');
      mock.timers.tick(5_000);
      assert.equal(s.sent.length, 2);
      assert.equal(s.sent[1]!.keepalive, true);
      assert.equal(s.sent[1]!.seq, 2n);
    }));
});
