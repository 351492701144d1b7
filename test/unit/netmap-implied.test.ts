// Netmaps in the shorter form for agents that say they reconstruct implied
// peer fields, in the old form for agents that do not, and a full netmap in
// place of a delta that would be larger.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import { Mapper } from '../../coordinator/mapper/mapper.js';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import {
  DnsRecordSchema,
  type NetMap,
  NetMapSchema,
  PeerSchema,
} from '../../proto/gen/meshgate/v1/types_pb.js';
import { hasNetmapFeature, IMPLIED_PEER_FIELDS, withImpliedFields } from '../../proto/netmap.js';
import { RecordingSession, testMapperOptions } from '../fixtures/mapper.js';
import { registerTestNode } from '../fixtures/nodes.js';

describe('implied peer fields', () => {
  it('are reconstructed exactly, and a netmap in the full form is left as it is', () => {
    const full = create(NetMapSchema, {
      domain: 'p.mesh',
      dns: [
        create(DnsRecordSchema, { name: 'me.p.mesh', ipAddresses: ['100.64.0.1', 'fd7a::1'] }),
        create(DnsRecordSchema, { name: 'a.p.mesh', ipAddresses: ['100.64.0.2', 'fd7a::2'] }),
        create(DnsRecordSchema, { name: 'b.p.mesh', ipAddresses: ['100.64.0.3', 'fd7a::3'] }),
      ],
      peers: [
        create(PeerSchema, {
          id: 'a',
          name: 'a',
          ipAddresses: ['100.64.0.2', 'fd7a::2'],
          allowedIps: ['100.64.0.2/32', 'fd7a::2/128', '10.1.0.0/16'],
        }),
        create(PeerSchema, {
          id: 'b',
          name: 'b',
          ipAddresses: ['100.64.0.3', 'fd7a::3'],
          allowedIps: ['100.64.0.3/32', 'fd7a::3/128'],
        }),
      ],
    });
    assert.equal(withImpliedFields(full), full, 'nothing to add to the full form');
    const short = create(NetMapSchema, {
      ...full,
      dns: [full.dns[0]!],
      peers: full.peers.map((p) => create(PeerSchema, { ...p, allowedIps: p.allowedIps.slice(2) })),
    });
    assert.deepEqual(withImpliedFields(short), full);
    // Each of the two reconstructions also on its own.
    const noAllowed = create(NetMapSchema, {
      ...full,
      peers: full.peers.map((p) => create(PeerSchema, { ...p, allowedIps: p.allowedIps.slice(2) })),
    });
    assert.deepEqual(withImpliedFields(noAllowed), full, 'DNS complete, allowed IPs implied');
    const noDns = create(NetMapSchema, { ...full, dns: [full.dns[0]!] });
    assert.deepEqual(withImpliedFields(noDns), full, 'allowed IPs complete, DNS implied');
  });

  it('are asked for in a header that may list other features', () => {
    assert.ok(hasNetmapFeature([IMPLIED_PEER_FIELDS], IMPLIED_PEER_FIELDS));
    assert.ok(hasNetmapFeature([`later-feature, ${IMPLIED_PEER_FIELDS}`], IMPLIED_PEER_FIELDS));
    assert.ok(!hasNetmapFeature([], IMPLIED_PEER_FIELDS), 'an old agent sends no header');
    assert.ok(!hasNetmapFeature(['implied-peer'], IMPLIED_PEER_FIELDS));
    assert.ok(!hasNetmapFeature([Buffer.from(IMPLIED_PEER_FIELDS)], IMPLIED_PEER_FIELDS));
    assert.ok(!hasNetmapFeature([`${'x,'.repeat(200)}${IMPLIED_PEER_FIELDS}`], IMPLIED_PEER_FIELDS));
  });
});

describe('the mapper, per agent', () => {
  let store: Store;
  let state: State;
  let mapper: Mapper;
  const ids: Record<string, string> = {};

  const register = async (name: string, tags: string[], routes: string[] = []) => {
    const node = await registerTestNode(state, {
      project: 'p',
      name,
      tags,
      routes,
      endpoints: ['192.0.2.1:41641'],
    });
    ids[name] = node.id;
    return node;
  };
  const policy = (src: string, dst: string) =>
    state.setPolicy(
      'test',
      'p',
      JSON.stringify({
        tagOwners: { 'tag:x': [], 'tag:a': [], 'tag:b': [] },
        acls: [{ action: 'accept', src: [src], dst: [`${dst}:*`] }],
      }),
    );

  before(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    mapper = new Mapper(state, testMapperOptions());
    await state.createProject('test', 'p');
    await register('x', ['tag:x']);
    await register('router', ['tag:b'], ['10.9.0.0/16']);
    await state.setNodeRoutes('test', ids.router!, 'p', ['10.9.0.0/16']);
    for (let i = 0; i < 70; i++) await register(`a${i}`, ['tag:a']);
    await policy('tag:x', 'tag:a');
    mapper.flush();
  });
  after(async () => {
    mapper.close();
    await store.close();
  });

  it('gives an old agent the full form, and a new one fewer bytes that decode to the same netmap', async () => {
    const old = new RecordingSession(ids.x!);
    mapper.attach(old);
    const map = old.sent[0]!.full!;
    assert.equal(map.peers.length, 70);
    for (const p of map.peers)
      assert.deepEqual(p.allowedIps, [`${p.ipAddresses[0]}/32`, `${p.ipAddresses[1]}/128`]);
    assert.equal(map.dns.length, 71, 'its own record and one per peer');

    const fresh = new RecordingSession(ids.x!, { implied: true });
    mapper.attach(fresh);
    const short = fresh.sent[0]!.full!;
    assert.ok(short.peers.every((p) => p.allowedIps.length === 0));
    assert.deepEqual(
      short.dns.map((r) => r.name),
      ['x.p.mesh'],
    );
    assert.ok(
      fresh.bytes[0]! < old.bytes[0]! * 0.7,
      `${fresh.bytes[0]} bytes against ${old.bytes[0]}: the repetitions are a third of the netmap`,
    );
    assert.deepEqual(fresh.map, old.map);
    assert.deepEqual(fresh.map, map, 'the old form decodes as it always did');

    // A peer with routes keeps them, after its addresses; in a delta too.
    const olds = new RecordingSession(ids.router!);
    const news = new RecordingSession(ids.router!, { implied: true });
    mapper.attach(olds);
    mapper.attach(news);
    await policy('tag:x', 'tag:b');
    mapper.flush();
    const router = (m: NetMap | null) => m?.peers.find((p) => p.id === ids.router);
    // The old session was replaced by the new one of the same node: compare with x's.
    assert.match(olds.closed, /replaced/);
    const xOld = new RecordingSession(ids.x!);
    mapper.attach(xOld);
    assert.deepEqual(router(xOld.map)?.allowedIps.slice(2), ['10.9.0.0/16']);
    assert.deepEqual(router(fresh.map), router(xOld.map));
    assert.equal(news.map?.peers.length, 1, 'the router sees x');
  });

  it('sends a full netmap instead of a delta that would be larger, and deltas otherwise', async () => {
    await policy('tag:x', 'tag:a');
    mapper.flush();
    const x = new RecordingSession(ids.x!, { implied: true });
    const a0 = new RecordingSession(ids.a0!, { implied: true });
    mapper.attach(x);
    mapper.attach(a0);
    assert.equal(x.map?.peers.length, 70);

    // x now sees the router alone: 70 ids removed against one peer in full.
    await policy('tag:x', 'tag:b');
    mapper.flush();
    const last = x.sent.at(-1)!;
    assert.equal(last.seq, 2n, 'the stream goes on in sequence');
    assert.ok(last.full, 'a full netmap');
    assert.deepEqual(last.peersRemoved, []);
    assert.deepEqual(
      x.map?.peers.map((p) => p.id),
      [ids.router],
    );
    assert.ok(x.map?.packetFilter, 'with its packet filter');
    const deltaBytes = 70 * (ids.a0!.length + 2);
    assert.ok(x.bytes.at(-1)! < deltaBytes, `${x.bytes.at(-1)} bytes, the delta would be over ${deltaBytes}`);

    // a0 loses one peer: a delta.
    const a = a0.sent.at(-1)!;
    assert.equal(a.full, undefined);
    assert.deepEqual(a.peersRemoved, [ids.x]);
    assert.deepEqual(a0.map?.peers, []);

    // Back: x gains 70 peers and loses one; a delta again.
    await policy('tag:x', 'tag:a');
    mapper.flush();
    const back = x.sent.at(-1)!;
    assert.equal(back.full, undefined);
    assert.equal(back.peersChanged.length, 70);
    assert.deepEqual(back.peersRemoved, [ids.router]);
    assert.equal(x.map?.peers.length, 70);
  });
});
