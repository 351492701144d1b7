// What streams that announce shared peers get of presence changes and policy
// changes, per group of nodes that see the same peers: only what the node may
// see, and nothing it has no use for.
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { Mapper } from '../../coordinator/mapper/mapper.js';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import type { SyncResponse } from '../../proto/gen/meshgate/v1/control_pb.js';
import { withSharedDelta } from '../../proto/netmap.js';
import { RecordingSession, testMapperOptions } from '../fixtures/mapper.js';
import { registerTestNode } from '../fixtures/nodes.js';

/** The message's shared parts, inflated into one delta without the message's own lists. */
const sharedOf = (m: SyncResponse) =>
  withSharedDelta({ ...m, peersChanged: [], peersRemoved: [], peerPatches: [] }, undefined);

describe('presence and policy parts per group of shared peers', () => {
  let store: Store;
  let state: State;
  let mapper: Mapper;
  const ids: Record<string, string> = {};
  const policyText = (acls: { src: string[]; dst: string[] }[]) =>
    JSON.stringify({
      tagOwners: { 'tag:a': [], 'tag:b': [], 'tag:c': [] },
      acls: acls.map((a) => ({ action: 'accept', ...a })),
    });
  const policy = async (acls: { src: string[]; dst: string[] }[]) => {
    await state.setPolicy('test', 'p', policyText(acls));
    mapper.flush();
  };
  /** Tag:a and tag:b nodes each see their own kind only; tag:c sees nothing. */
  const apart = [
    { src: ['tag:a'], dst: ['tag:a:*'] },
    { src: ['tag:b'], dst: ['tag:b:*'] },
  ];
  const shared = (name: string) => {
    const r = new RecordingSession(ids[name]!, { implied: true, shared: true });
    mapper.attach(r);
    return r;
  };
  const presence = (online: boolean, names: string[]) => {
    for (const name of names) state.setOnline(ids[name]!, online);
    mapper.flush();
  };
  /** b0 … b(n-1). */
  const bs = (n: number) => Array.from({ length: n }, (_, i) => `b${i}`);
  const idsOf = (names: string[]) => new Set(names.map((n) => ids[n]));
  /** A mapper that flushes only when told: what happens meanwhile is one batch. */
  const batching = () => new Mapper(state, testMapperOptions({ coalesceMs: 60_000, presenceMs: 60_000 }));
  const registerAs = async (name: string, tag: string) => {
    ids[name] = (await registerTestNode(state, { project: 'p', name, tags: [tag] })).id;
  };

  beforeEach(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    mapper = new Mapper(state, testMapperOptions());
    await state.createProject('test', 'p');
    for (let i = 0; i < 4; i++) await registerAs(`a${i}`, 'tag:a');
    for (let i = 0; i < 20; i++) await registerAs(`b${i}`, 'tag:b');
    await registerAs('c', 'tag:c');
    await policy(apart);
  });
  afterEach(async () => {
    mapper.close();
    await store.close();
  });

  it('go one by one below 16 patches in a batch, and as one compressed part from 16 on', () => {
    const b19 = shared('b19');
    presence(true, bs(15));
    const few = b19.sent.at(-1)!;
    assert.equal(few.seq, 2n);
    assert.deepEqual(new Set(few.peerPatches.map((p) => p.id)), idsOf(bs(15)));
    assert.deepEqual(few.shared, []);

    state.setOnline(ids.b15!, true);
    presence(false, bs(15));
    const batch = b19.sent.at(-1)!;
    assert.equal(batch.seq, 3n);
    assert.deepEqual(batch.peerPatches, []);
    assert.equal(batch.shared.length, 1);
    assert.deepEqual(new Set(sharedOf(batch).peerPatches.map((p) => p.id)), idsOf(bs(16)));
    for (const name of bs(16))
      assert.equal(b19.map!.peers.find((p) => p.id === ids[name])?.online, name === 'b15', name);
  });

  it("carry no presence of nodes the group cannot see, and none of a node's own alone to it", () => {
    const a0 = shared('a0');
    const a1 = shared('a1');
    const b19 = shared('b19');
    const c = shared('c');
    presence(true, bs(16));
    assert.equal(a0.sent.length, 1, 'a group without changes gets nothing, of tag:b nodes least of all');
    assert.equal(c.sent.length, 1, 'nor does a node that sees no one');
    assert.deepEqual(new Set(sharedOf(b19.sent.at(-1)!).peerPatches.map((p) => p.id)), idsOf(bs(16)));

    // 17 patches in the project, of which only a0's own in its group.
    state.setOnline(ids.a0!, true);
    presence(false, bs(16));
    assert.equal(a0.sent.length, 1, 'a0 is not told of its own presence');
    const got = a1.sent.at(-1)!;
    assert.equal(got.seq, 2n);
    assert.deepEqual(
      sharedOf(got).peerPatches.map((p) => [p.id, p.online]),
      [[ids.a0, true]],
    );
    assert.equal(a1.map!.peers.find((p) => p.id === ids.a0)?.online, true);
    assert.deepEqual(new Set(a1.map!.peers.map((p) => p.id)), idsOf(['a0', 'a2', 'a3']));
    const last = b19.sent.at(-1)!;
    assert.deepEqual(new Set(sharedOf(last).peerPatches.map((p) => p.id)), idsOf(bs(16)));
    assert.equal(c.sent.length, 1);

    // With a peer's patch along, a0 gets its group's part, its own patch first in it.
    state.setOnline(ids.a0!, false);
    state.setOnline(ids.a1!, true);
    presence(true, bs(16));
    assert.equal(a0.sent.length, 2);
    assert.deepEqual(
      sharedOf(a0.sent.at(-1)!).peerPatches.map((p) => [p.id, p.online]),
      [
        [ids.a0, false],
        [ids.a1, true],
      ],
    );
    assert.equal(a0.map!.peers.find((p) => p.id === ids.a1)?.online, true);
  });

  it('after a policy change, carry the peers the group gains alone, in the implied form', async () => {
    const a0 = shared('a0');
    await policy([...apart, { src: ['tag:a'], dst: ['tag:c:*'] }]);
    const got = a0.sent.at(-1)!;
    assert.equal(got.seq, 2n);
    assert.deepEqual(got.peersChanged, []);
    assert.equal(got.shared.length, 1);
    const part = sharedOf(got);
    assert.deepEqual(
      part.peersChanged.map((p) => p.id),
      [ids.c],
    );
    assert.deepEqual(part.peersRemoved, []);
    assert.deepEqual(part.peersChanged[0]!.allowedIps, [], 'its own addresses are implied');
    const cAt = a0.map!.peers.find((p) => p.id === ids.c)!;
    assert.deepEqual(
      cAt.allowedIps,
      cAt.ipAddresses.map((a) => (a.includes(':') ? `${a}/128` : `${a}/32`)),
    );
    assert.equal(a0.map!.peers.length, 4);
  });

  it('after policies that changed twice before a flush, give each stream what its own policy lacked', async () => {
    const m = batching();
    try {
      const a0 = new RecordingSession(ids.a0!, { implied: true, shared: true });
      m.attach(a0);
      // b0 opens under the rules in the other order: its group there has the
      // key a0's group has under `apart`, with other members.
      await state.setPolicy('test', 'p', policyText([apart[1]!, apart[0]!]));
      const b0 = new RecordingSession(ids.b0!, { implied: true, shared: true });
      m.attach(b0);
      await state.setPolicy(
        'test',
        'p',
        policyText([{ src: ['tag:a', 'tag:b'], dst: ['tag:a:*', 'tag:b:*'] }]),
      );
      m.flush();
      const all = [...['a0', 'a1', 'a2', 'a3'], ...bs(20)];
      assert.deepEqual(new Set(a0.map!.peers.map((p) => p.id)), idsOf(all.filter((n) => n !== 'a0')));
      assert.deepEqual(new Set(b0.map!.peers.map((p) => p.id)), idsOf(all.filter((n) => n !== 'b0')));
    } finally {
      m.close();
    }
  });

  it("give a group's stream its full netmap with long source lists compressed", () => {
    const b19 = shared('b19');
    const [rule] = b19.sent[0]!.full!.packetFilter!.rules;
    assert.deepEqual(rule!.srcCidrs, [], 'sent compressed instead');
    assert.ok(rule!.sharedSrcCidrs.length > 0);
    const sources = b19.map!.packetFilter!.rules[0]!.srcCidrs;
    for (const name of bs(20)) assert.ok(sources.includes(`${state.getNode(ids[name]!)!.ipv4}/32`), name);
  });

  it('send a new node once, as a changed peer, with no part beside it', async () => {
    const b19 = shared('b19');
    await registerAs('b20', 'tag:b');
    mapper.flush();
    const got = b19.sent.at(-1)!;
    assert.deepEqual(
      got.peersChanged.map((p) => p.id),
      [ids.b20],
    );
    assert.deepEqual(got.shared, [], 'no policy part repeats it');
  });

  it("leave out of a group's part the patch of a node that also changed in the batch", async () => {
    const m = batching();
    try {
      const b19 = new RecordingSession(ids.b19!, { implied: true, shared: true });
      m.attach(b19);
      for (const name of bs(17)) state.setOnline(ids[name]!, true);
      await state.renameNode('test', ids.b0!, 'p', 'b0-renamed');
      m.flush();
      const got = b19.sent.at(-1)!;
      assert.deepEqual(
        got.peersChanged.map((p) => [p.name, p.online]),
        [['b0-renamed', true]],
        'the changed peer carries its presence',
      );
      assert.deepEqual(new Set(sharedOf(got).peerPatches.map((p) => p.id)), idsOf(bs(17).slice(1)));
    } finally {
      m.close();
    }
  });

  it('after a policy change that leaves the group its peers, send the group nothing', async () => {
    const a0 = shared('a0');
    const c = shared('c');
    await policy([...apart, { src: ['tag:c'], dst: ['tag:b:22'] }]);
    assert.equal(a0.sent.length, 1);
    assert.ok(c.sent.length > 1, 'c gets its new peers');
    assert.equal(c.map!.peers.length, 20);
  });
});
