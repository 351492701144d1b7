// Full netmaps whose peers are compressed once per group of nodes that see the
// same peers, for agents that announce the shared-peers feature: the agent
// must end up with the netmap it would have had in any other form.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { deflateRawSync } from 'node:zlib';
import { create, toBinary } from '@bufbuild/protobuf';
import { Mapper } from '../../coordinator/mapper/mapper.js';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import {
  FilterRuleSchema,
  type NetMap,
  NetMapSchema,
  NodeSchema,
  PacketFilterSchema,
  PeerSchema,
} from '../../proto/gen/meshgate/v1/types_pb.js';
import {
  applySync,
  hasNetmapFeature,
  IMPLIED_PEER_FIELDS,
  MAX_SHARED_PEERS_BYTES,
  NetmapError,
  SHARED_PEERS,
  withSharedPeers,
} from '../../proto/netmap.js';
import { RecordingSession, testMapperOptions } from '../fixtures/mapper.js';
import { registerTestNode } from '../fixtures/nodes.js';

describe('shared peers, as the agent applies them', () => {
  const peer = (id: string, name = id) =>
    create(PeerSchema, { id, name, ipAddresses: [`100.64.0.${id.length}`] });
  const block = (...peers: ReturnType<typeof peer>[]) =>
    deflateRawSync(toBinary(NetMapSchema, create(NetMapSchema, { peers })));

  it('leave out the node itself, and a peer the netmap carries replaces its stale copy in place', () => {
    const m = create(NetMapSchema, {
      self: create(NodeSchema, { id: 'me' }),
      peers: [peer('b', 'b-renamed'), peer('z')],
      sharedPeers: block(peer('a'), peer('me'), peer('b'), peer('c')),
    });
    const got = withSharedPeers(m);
    assert.deepEqual(
      got.peers.map((p) => `${p.id}:${p.name}`),
      ['a:a', 'b:b-renamed', 'c:c', 'z:z'],
    );
    assert.equal(got.sharedPeers.length, 0);
    const plain = create(NetMapSchema, { peers: [peer('a')] });
    assert.equal(withSharedPeers(plain), plain, 'a netmap without shared peers is left as it is');
  });

  it('in a delta, come before its own lists, without the node itself among the changed peers', () => {
    const part = (init: Parameters<typeof create<typeof SyncResponseSchema>>[1]) =>
      deflateRawSync(toBinary(SyncResponseSchema, create(SyncResponseSchema, init)));
    const start = create(SyncResponseSchema, {
      seq: 1n,
      full: create(NetMapSchema, { self: create(NodeSchema, { id: 'me' }), peers: [peer('a'), peer('b')] }),
    });
    const map = applySync(null, 0n, start);
    const delta = create(SyncResponseSchema, {
      seq: 2n,
      peersChanged: [peer('c', 'c-own')],
      shared: [
        part({ peersChanged: [peer('me'), peer('c'), peer('d')], peersRemoved: ['a', 'me'] }),
        part({
          peerPatches: [
            { id: 'b', online: true },
            { id: 'me', online: true },
          ],
        }),
      ],
    });
    const next = applySync(map, 1n, delta)!;
    assert.deepEqual(
      next.peers.map((p) => `${p.id}:${p.name}:${p.online}`),
      ['b:b:true', 'c:c-own:false', 'd:d:false'],
    );
    assert.throws(
      () => applySync(next, 2n, create(SyncResponseSchema, { seq: 3n, shared: [Buffer.from('junk')] })),
      /^NetmapError: the delta's shared parts do not inflate: /,
    );
  });

  it('go by the names the wire contract gives them, announced in a header of bounded length', () => {
    assert.equal(SHARED_PEERS, 'shared-peers');
    assert.equal(IMPLIED_PEER_FIELDS, 'implied-peer-fields');
    const header = `${IMPLIED_PEER_FIELDS},${SHARED_PEERS}`;
    assert.ok(
      hasNetmapFeature([header.padStart(256, ',')], SHARED_PEERS),
      'a list of 256 characters is read',
    );
    assert.ok(!hasNetmapFeature([header.padStart(257, ',')], SHARED_PEERS), 'a longer one is not');
  });

  it('are expanded without the node itself also in a netmap that has no self, and in every rule of a filter', () => {
    const noSelf = withSharedPeers(create(NetMapSchema, { sharedPeers: block(peer('a'), peer('b')) }));
    assert.deepEqual(
      noSelf.peers.map((p) => p.id),
      ['a', 'b'],
    );
    const sources = (srcCidrs: string[]) =>
      deflateRawSync(toBinary(FilterRuleSchema, create(FilterRuleSchema, { srcCidrs })));
    const filter = create(PacketFilterSchema, {
      rules: [
        create(FilterRuleSchema, { srcCidrs: ['0.0.0.0/0'], dstCidrs: ['100.64.0.1/32'] }),
        create(FilterRuleSchema, {
          srcCidrs: ['100.64.0.9/32'],
          sharedSrcCidrs: sources(['100.64.0.7/32', '100.64.0.8/32']),
        }),
      ],
    });
    const map = applySync(
      null,
      0n,
      create(SyncResponseSchema, { seq: 1n, full: create(NetMapSchema, { packetFilter: filter }) }),
    )!;
    assert.deepEqual(
      map.packetFilter!.rules.map((r) => [r.srcCidrs, r.dstCidrs, r.sharedSrcCidrs.length]),
      [
        [['0.0.0.0/0'], ['100.64.0.1/32'], 0],
        [['100.64.0.7/32', '100.64.0.8/32', '100.64.0.9/32'], [], 0],
      ],
    );
  });

  it('of one message are refused when together they would inflate beyond the limit, however they are split', () => {
    // Each part valid and under the limit: a third of it, as one long string.
    const long = 'a'.repeat(Math.ceil(MAX_SHARED_PEERS_BYTES / 3));
    const removal = deflateRawSync(
      toBinary(SyncResponseSchema, create(SyncResponseSchema, { peersRemoved: [long] })),
    );
    const map = applySync(null, 0n, create(SyncResponseSchema, { seq: 1n, full: create(NetMapSchema, {}) }))!;
    assert.ok(applySync(map, 1n, create(SyncResponseSchema, { seq: 2n, shared: [removal, removal] })));
    assert.throws(
      () => applySync(map, 1n, create(SyncResponseSchema, { seq: 2n, shared: [removal, removal, removal] })),
      /^NetmapError: the delta's shared parts do not inflate: /,
    );
    const sources = deflateRawSync(
      toBinary(FilterRuleSchema, create(FilterRuleSchema, { srcCidrs: [long] })),
    );
    const third = deflateRawSync(toBinary(NetMapSchema, create(NetMapSchema, { peers: [peer(long)] })));
    const filter = create(PacketFilterSchema, {
      rules: [sources, sources].map((b) => create(FilterRuleSchema, { sharedSrcCidrs: b })),
    });
    assert.throws(
      () =>
        applySync(
          null,
          0n,
          create(SyncResponseSchema, {
            seq: 1n,
            full: create(NetMapSchema, { sharedPeers: third, packetFilter: filter }),
          }),
        ),
      /^NetmapError: the packet filter's shared sources do not inflate: /,
    );
  });

  it('are refused with a NetmapError when they inflate beyond the limit or are not DEFLATE', () => {
    const bomb = deflateRawSync(Buffer.alloc(MAX_SHARED_PEERS_BYTES + 1));
    assert.ok(bomb.length < 64 * 1024, 'a small message');
    const full = (sharedPeers: Uint8Array) =>
      create(SyncResponseSchema, { seq: 1n, full: create(NetMapSchema, { sharedPeers }) });
    assert.throws(
      () => applySync(null, 0n, full(bomb)),
      (e: Error) => {
        assert.ok(e instanceof NetmapError);
        assert.equal(e.name, 'NetmapError');
        assert.match(e.message, /^the netmap's shared peers do not inflate: /);
        return true;
      },
    );
    assert.throws(() => applySync(null, 0n, full(Buffer.from('not deflate at all'))), NetmapError);
    const filter = create(PacketFilterSchema, {
      rules: [create(FilterRuleSchema, { sharedSrcCidrs: Buffer.from('junk') })],
    });
    assert.throws(
      () =>
        applySync(
          null,
          0n,
          create(SyncResponseSchema, { seq: 1n, full: create(NetMapSchema, { packetFilter: filter }) }),
        ),
      /^NetmapError: the packet filter's shared sources do not inflate: /,
    );
    assert.throws(
      () => applySync(null, 0n, full(deflateRawSync(Buffer.from([0x12, 0x40, 1])))),
      /shared peers do not decode/,
    );
  });
});

describe('shared peers from the mapper', () => {
  let store: Store;
  let state: State;
  let mapper: Mapper;
  let reference: Mapper;
  const ids: Record<string, string> = {};
  const register = async (name: string, tags: string[]) => {
    const node = await registerTestNode(state, { project: 'p', name, tags, endpoints: ['192.0.2.1:41641'] });
    ids[name] = node.id;
  };
  const policy = (acls: { src: string[]; dst: string[] }[]) =>
    state.setPolicy(
      'test',
      'p',
      acls.length
        ? JSON.stringify({
            tagOwners: { 'tag:x': [], 'tag:a': [], 'tag:b': [] },
            acls: acls.map((a) => ({ action: 'accept', ...a })),
          })
        : '',
    );
  /**
   * The netmap of `name` in the implied form without shared peers: what the
   * agent must end up with. From a mapper of its own, so that the stream
   * under test is not replaced.
   */
  const expected = (name: string) => {
    const r = new RecordingSession(ids[name]!, { implied: true });
    reference.attach(r);
    return r;
  };
  const view = (m: NetMap | null) => ({
    peers: [...(m?.peers ?? [])].sort((x, y) => x.id.localeCompare(y.id)),
    packetFilter: m?.packetFilter,
  });
  const shared = (name: string) => {
    const r = new RecordingSession(ids[name]!, { implied: true, shared: true });
    mapper.attach(r);
    return r;
  };

  before(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    const options = testMapperOptions();
    mapper = new Mapper(state, options);
    reference = new Mapper(state, options);
    await state.createProject('test', 'p');
    await register('x', ['tag:x']);
    for (let i = 0; i < 150; i++) await register(`a${i}`, ['tag:a']);
    for (let i = 0; i < 150; i++) await register(`b${i}`, ['tag:b']);
    mapper.flush();
  });
  after(async () => {
    mapper.close();
    reference.close();
    await store.close();
  });

  it('give every node of a project without policy the same bytes, which decode to its own netmap', () => {
    const want = expected('a0');
    const got = shared('a0');
    const other = shared('b7');
    assert.equal(got.sent[0]!.full!.peers.length, 0, 'every peer is in the shared block');
    assert.ok(got.sent[0]!.full!.sharedPeers.length > 0);
    assert.deepEqual(got.map, want.map);
    assert.equal(got.map!.peers.length, 300);
    assert.ok(!got.map!.peers.some((p) => p.id === ids.a0), 'not itself');
    assert.ok(
      Buffer.from(other.sent[0]!.full!.sharedPeers).equals(got.sent[0]!.full!.sharedPeers),
      'compressed once for all of them',
    );
    assert.deepEqual(other.map, expected('b7').map);
    assert.ok(got.bytes[0]! < want.bytes[0]! / 2, `${got.bytes[0]} bytes against ${want.bytes[0]}`);
  });

  it('send the peers that changed since compression along, until enough changed to compress again', () => {
    const first = shared('a1').sent[0]!.full!.sharedPeers;
    state.setOnline(ids.b3!, true);
    mapper.flush();
    const later = shared('a2');
    const full = later.sent[0]!.full!;
    assert.ok(Buffer.from(full.sharedPeers).equals(first), 'the same block');
    assert.deepEqual(
      full.peers.map((p) => [p.id, p.online]),
      [[ids.b3, true]],
    );
    assert.equal(later.map!.peers.find((p) => p.id === ids.b3)?.online, true);
    assert.deepEqual(later.map, expected('a2').map);

    for (let i = 0; i < 150; i++) state.setOnline(ids[`a${i}`]!, true);
    mapper.flush();
    const fresh = shared('a3').sent[0]!.full!;
    assert.ok(!Buffer.from(fresh.sharedPeers).equals(first), 'compressed again');
    assert.equal(fresh.peers.length, 0);
    assert.deepEqual(shared('a4').map, expected('a4').map);
  });

  it('with a policy, are shared by the nodes that see the same peers, and each sees what the policy lets it', async () => {
    await policy([
      { src: ['tag:a'], dst: ['tag:b:*'] },
      { src: ['tag:x'], dst: ['tag:x:*', 'tag:a:22'] },
    ]);
    mapper.flush();
    for (const name of ['x', 'a0', 'a5', 'b0', 'b9'])
      assert.deepEqual(shared(name).map, expected(name).map, name);
    const blockOf = (name: string) => Buffer.from(shared(name).sent[0]!.full!.sharedPeers);
    assert.ok(blockOf('b0').equals(blockOf('b9')));
    assert.ok(!blockOf('a0').equals(blockOf('b0')), 'a and b see different peers');
    assert.equal(shared('x').map!.peers.length, 150, 'x sees the tag:a nodes, not itself');
  });

  it('after a policy change, come as one compressed part for every node that moves between the same groups', async () => {
    await policy([{ src: ['tag:x'], dst: ['tag:x:*'] }]);
    mapper.flush();
    const a = shared('a0');
    const a9 = shared('a9');
    const old = new RecordingSession(ids.a1!, { implied: true });
    mapper.attach(old);
    const b = shared('b0');
    const oldB = new RecordingSession(ids.b1!, { implied: true });
    mapper.attach(oldB);
    assert.equal(a.map!.peers.length, 0);
    await policy([{ src: ['tag:a'], dst: ['tag:b:*'] }]);
    mapper.flush();
    // b0's filter lets in the 150 tag:a nodes: their addresses go compressed.
    const rule = b.sent.at(-1)!.packetFilter!.rules.find((r) => r.sharedSrcCidrs.length)!;
    assert.deepEqual(rule.srcCidrs, []);
    assert.deepEqual(view(b.map), view(expected('b0').map));
    assert.equal(b.map!.packetFilter!.rules[0]!.srcCidrs.length, 300, 'both addresses of each');
    assert.ok(b.bytes.at(-1)! < oldB.bytes.at(-1)! / 2, `${b.bytes.at(-1)} against ${oldB.bytes.at(-1)}`);
    const last = a.sent.at(-1)!;
    assert.equal(last.seq, 2n);
    assert.equal(last.full, undefined, 'a delta');
    assert.deepEqual(last.peersChanged, []);
    assert.equal(last.shared.length, 1);
    assert.ok(
      Buffer.from(a9.sent.at(-1)!.shared[0]!).equals(last.shared[0]!),
      'the same bytes for a0 and a9',
    );
    assert.equal(a.map!.peers.length, 150);
    // Deltas carry no DNS records; peers and packet filter are what a fresh stream gets.
    assert.deepEqual(view(a.map), view(expected('a0').map));
    assert.deepEqual(view(a9.map), view(expected('a9').map));
    assert.equal(old.sent.at(-1)!.peersChanged.length, 150, 'a stream without the feature gets the peers');
    assert.ok(a.bytes.at(-1)! < old.bytes.at(-1)! / 2, `${a.bytes.at(-1)} against ${old.bytes.at(-1)}`);

    // And back: the part hides them again.
    await policy([{ src: ['tag:x'], dst: ['tag:x:*'] }]);
    mapper.flush();
    assert.equal(a.sent.at(-1)!.shared.length, 1);
    assert.deepEqual(a.map!.peers, []);
    assert.deepEqual(old.map!.peers, []);
  });

  it('after a presence batch, come as one compressed part holding the patches of the group', async () => {
    await policy([]);
    mapper.flush();
    const a = shared('a0');
    const old = new RecordingSession(ids.a1!, { implied: true });
    mapper.attach(old);
    for (let i = 20; i < 40; i++) state.setOnline(ids[`b${i}`]!, true);
    mapper.flush();
    const last = a.sent.at(-1)!;
    assert.deepEqual(last.peerPatches, []);
    assert.equal(last.shared.length, 1);
    assert.equal(old.sent.at(-1)!.peerPatches.length, 20);
    assert.deepEqual(a.map, expected('a0').map);
    assert.equal(a.map!.peers.find((p) => p.id === ids.b33)?.online, true);
    assert.ok(a.bytes.at(-1)! < old.bytes.at(-1)!, `${a.bytes.at(-1)} against ${old.bytes.at(-1)}`);
  });

  it('are not used where a node sees its own kind (autogroup:self), and the netmap is the same', async () => {
    await register('u0', []);
    await register('u1', []);
    const selfPolicy = JSON.stringify({
      tagOwners: { 'tag:x': [], 'tag:a': [], 'tag:b': [] },
      acls: [
        { action: 'accept', src: ['tag:a'], dst: ['tag:b:*'] },
        { action: 'accept', src: ['autogroup:member'], dst: ['autogroup:self:*'] },
      ],
    });
    await state.setPolicy('test', 'p', selfPolicy);
    mapper.flush();
    assert.equal(state.compiled('p').peerGroup(ids.u0!), undefined);
    for (const name of ['u0', 'a0']) {
      const got = shared(name);
      assert.equal(got.sent[0]!.full!.sharedPeers.length, 0);
      assert.deepEqual(got.map, expected(name).map);
    }

    // Without a group before, the peers a change of policy shows go one by
    // one; when they outweigh the full netmap, it goes instead.
    const b = shared('b0');
    assert.equal(b.map!.peers.length, 150);
    await policy([]);
    mapper.flush();
    const last = b.sent.at(-1)!;
    assert.ok(last.full, 'a full netmap');
    assert.ok(last.full.sharedPeers.length > 0);
    assert.equal(b.map!.peers.length, 302);
    assert.deepEqual(b.map, expected('b0').map);
  });
});
