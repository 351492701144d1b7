import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Mapper, type Session } from '../../coordinator/mapper/mapper.js';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import type { SyncResponse } from '../../proto/gen/meshgate/v1/control_pb.js';
import { encodeWgKey, generateMachineKey, generateNodeKey } from '../../proto/keys.js';

class FakeSession implements Session {
  readonly sent: SyncResponse[] = [];
  closed = '';
  constructor(readonly nodeId: string) {}
  send(msg: SyncResponse) {
    this.sent.push(msg);
  }
  close(reason: string) {
    this.closed = reason;
  }
}

describe('mapper fan-out', () => {
  let store: Store;
  let state: State;
  let mapper: Mapper;
  const ids: Record<string, string> = {};

  const register = async (name: string, tags: string[]) => {
    const { key } = await state.keys.createAuthKey('test', {
      project: 'p',
      reusable: false,
      ephemeral: false,
      expiresInMs: 60_000,
      tags,
      reason: '',
    });
    const { node } = await state.register({
      authKey: key,
      machineKey: Buffer.from(generateMachineKey().publicKey).toString('hex'),
      nodeKey: encodeWgKey(generateNodeKey().publicKey),
      hostname: name,
      os: 'linux',
      version: '1',
      requestedTags: [],
      endpoints: [],
      advertisedRoutes: [],
    });
    ids[name] = node.id;
    return node;
  };

  before(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    mapper = new Mapper(state, {
      coalesceMs: 5,
      keepaliveMs: 60_000,
      keepaliveSeconds: 25,
      relay: false,
      domainSuffix: 'mesh',
    });
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
    assert.deepEqual(s.ops.sent.at(-1)!.peersRemoved, [ids.fw]);
    assert.equal(s.m1.sent.length, 1, 'm1 never saw fw');
  });
});
