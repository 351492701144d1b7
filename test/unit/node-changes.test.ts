// Changes to registered nodes, by their agents and by admins: what is
// stored, what peers are told (events), what the audit log and the change
// log for other coordinators record, and what a refused change says. The
// node changes are built from the state's parts, so that the address pool,
// presence and change log can be looked at.
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';
import type { Change, ChangeLog } from '../../coordinator/state/changelog.js';
import { Counters } from '../../coordinator/state/counters.js';
import { CoordinatorError } from '../../coordinator/state/errors.js';
import { EventBus, type StateEvent } from '../../coordinator/state/events.js';
import { AddressPool } from '../../coordinator/state/ipam.js';
import { KeyStore } from '../../coordinator/state/keys.js';
import { NodeChanges } from '../../coordinator/state/node-changes.js';
import { NodeIndex } from '../../coordinator/state/node-index.js';
import { Presence } from '../../coordinator/state/presence.js';
import { Projects } from '../../coordinator/state/projects.js';
import { type NodeRecord, nodeFromRow, nodeToRow } from '../../coordinator/state/records.js';
import { Registration } from '../../coordinator/state/registration.js';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { encodeWgKey, generateNodeKey } from '../../proto/keys.js';
import { registerInput } from '../fixtures/nodes.js';

const MINUTE = 60_000;
const nodeKey = () => encodeWgKey(generateNodeKey().publicKey);

const fails = (kind: CoordinatorError['kind'], re: RegExp) => (err: unknown) => {
  assert.ok(err instanceof CoordinatorError, String(err));
  assert.equal(err.kind, kind);
  assert.match(err.message, re);
  return true;
};

describe('node changes', () => {
  let store: Store;
  let now: number;
  let nodes: NodeIndex;
  let pool: AddressPool;
  let presence: Presence;
  let changes: NodeChanges;
  let registration: Registration;
  let keys: KeyStore;
  let events: StateEvent[];
  let logged: Change[];

  beforeEach(async () => {
    now = 1_800_000_000_000;
    logged = [];
    store = await openStore({ url: ':memory:' });
    const clock = () => now;
    nodes = new NodeIndex();
    const bus = new EventBus();
    const counters = new Counters(store.db, false);
    await counters.load();
    const log: ChangeLog = {
      record: async (_tx, ...c) => {
        logged.push(...c);
      },
    };
    const projects = new Projects(store.db, clock, counters, nodes, bus, log);
    pool = new AddressPool([]);
    presence = new Presence(store.db, clock, nodes, bus);
    keys = new KeyStore(store.db, clock, (name) => projects.require(name));
    changes = new NodeChanges(store.db, clock, nodes, pool, presence, bus, log);
    registration = new Registration(clock, { nodes, projects, keys, counters, pool, changes, events: bus });
    await projects.create('test', 'p');
    await projects.create('test', 'q');
    events = [];
    logged = [];
    bus.on((e) => events.push(e));
  });
  afterEach(async () => {
    await presence.close();
    await store.close();
  });

  const join = async (
    hostname: string,
    opts: { project?: string; routes?: string[]; endpoints?: string[] } = {},
  ): Promise<NodeRecord> => {
    const { key } = await keys.createAuthKey('test', {
      project: opts.project ?? 'p',
      reusable: false,
      ephemeral: false,
      expiresInMs: MINUTE,
      tags: [],
      reason: '',
    });
    const { node } = await registration.register(
      registerInput(key, hostname, { endpoints: opts.endpoints ?? [], advertisedRoutes: opts.routes ?? [] }),
    );
    events.length = 0;
    logged.length = 0;
    return node;
  };
  const stored = async (id: string) => {
    const row = await store.db.selectFrom('nodes').selectAll().where('id', '=', id).executeTakeFirst();
    return row && nodeFromRow(row);
  };
  const auditRows = async () =>
    (await store.db.selectFrom('audit_log').selectAll().orderBy('id').execute())
      .filter((r) => r.action.startsWith('node.'))
      .map((r) => [Number(r.at), r.actor, r.action, r.target, r.project, JSON.parse(r.detail)]);
  const seen = () => events.map((e) => [e.type, 'node' in e ? e.node.name : '']);
  const nodeLogged = (n: NodeRecord) => [{ kind: 'node', ref: n.id }];

  describe('by agents', () => {
    it('stores new endpoints and tells peers, and ignores the same ones or an unknown node', async () => {
      const a = await join('a', { endpoints: ['192.0.2.1:1'] });
      await changes.updateEndpoints(a.id, ['192.0.2.1:1']);
      await changes.updateEndpoints('unknown', ['192.0.2.2:2']);
      assert.deepEqual([events, logged], [[], []]);
      for (const endpoints of [
        ['192.0.2.1:1', '192.0.2.2:2'],
        ['192.0.2.2:2', '192.0.2.1:1'],
        ['192.0.2.2:2'],
        ['192.0.2.3:3'],
      ]) {
        events.length = 0;
        logged.length = 0;
        await changes.updateEndpoints(a.id, endpoints);
        assert.deepEqual(nodes.get(a.id)?.endpoints, endpoints);
        assert.deepEqual((await stored(a.id))?.endpoints, endpoints);
        assert.deepEqual(events, [{ type: 'node-patched', node: nodes.get(a.id), endpointsChanged: true }]);
        assert.deepEqual(logged, nodeLogged(a));
      }
    });

    it('stores the ports a node locks down without telling peers', async () => {
      const a = await join('a');
      await changes.updateLockdownPorts(a.id, []);
      await changes.updateLockdownPorts('unknown', [22]);
      assert.deepEqual(logged, []);
      await changes.updateLockdownPorts(a.id, [22, 443]);
      assert.deepEqual(nodes.get(a.id)?.lockdownPorts, [22, 443]);
      assert.deepEqual((await stored(a.id))?.lockdownPorts, [22, 443]);
      assert.deepEqual(logged, nodeLogged(a));
      assert.deepEqual(events, []);
    });

    it('stores and announces a new agent version once', async () => {
      const a = await join('a');
      await changes.updateVersion(a.id, '1');
      await changes.updateVersion('unknown', '2');
      assert.deepEqual([events, logged], [[], []]);
      await changes.updateVersion(a.id, '2');
      await changes.updateVersion(a.id, '2');
      assert.equal(nodes.get(a.id)?.version, '2');
      assert.equal((await stored(a.id))?.version, '2');
      assert.deepEqual(events, [{ type: 'node-changed', node: nodes.get(a.id) }]);
      assert.deepEqual(logged, nodeLogged(a));
    });

    it('rotates a node key: dated, stored and announced; refused when unknown or taken', async () => {
      const a = await join('a');
      const b = await join('b');
      await assert.rejects(
        changes.rotateNodeKey('unknown', nodeKey()),
        fails('not-found', /^node does not exist$/),
      );
      assert.equal(
        await changes.rotateNodeKey(a.id, a.nodeKey),
        nodes.get(a.id),
        'the same key: nothing to do',
      );
      assert.deepEqual([events, logged], [[], []]);
      await assert.rejects(
        changes.rotateNodeKey(a.id, b.nodeKey),
        fails('exists', /^node key is already used by another node; generate a new node key$/),
      );

      now += MINUTE;
      const next = nodeKey();
      const rotated = await changes.rotateNodeKey(a.id, next);
      assert.deepEqual(rotated, { ...a, nodeKey: next, keySetAt: now });
      assert.deepEqual(await stored(a.id), rotated);
      assert.deepEqual(nodes.get(a.id), rotated);
      assert.deepEqual(seen(), [['node-changed', 'a']]);
      assert.deepEqual(logged, nodeLogged(a));
      await assert.rejects(changes.rotateNodeKey(b.id, next), fails('exists', /node key is already used/));
      await changes.rotateNodeKey(b.id, a.nodeKey);
      assert.equal(nodes.get(b.id)?.nodeKey, a.nodeKey, 'the old key is free again');
    });

    it('frees a node key whose rotation the store refused', async () => {
      const a = await join('a');
      const b = await join('b');
      const taken = nodeKey();
      const foreign = { ...nodeToRow(b), id: 'elsewhere', machine_key: 'mk', name: 'x', ip_index: 99 };
      await store.db
        .insertInto('nodes')
        .values({
          ...foreign,
          node_key: taken,
          ipv4: '100.64.0.99',
          ipv6: 'fd7a:115c:a1e0::63',
          numeric_id: 99,
        })
        .execute();
      await assert.rejects(changes.rotateNodeKey(a.id, taken), fails('exists', /node key is already used/));
      assert.equal(nodes.get(a.id)?.nodeKey, a.nodeKey);
      await store.db.deleteFrom('nodes').where('id', '=', 'elsewhere').execute();
      assert.equal((await changes.rotateNodeKey(b.id, taken)).nodeKey, taken);
    });

    it('lets a node log out: removed, its address and presence forgotten, audited as the node', async () => {
      const a = await join('a');
      const b = await join('b');
      presence.set(a.id, true);
      events.length = 0;
      now += MINUTE;
      await changes.logout(a.id);
      await changes.logout('unknown');
      assert.equal(nodes.get(a.id), undefined);
      assert.equal(await stored(a.id), undefined);
      assert.equal(presence.isOnline(a.id), false);
      assert.equal(pool.reserveFrom(a.ipIndex), a.ipIndex, 'its address is free');
      assert.deepEqual(seen(), [['node-removed', 'a']]);
      assert.deepEqual(logged, nodeLogged(a));
      assert.deepEqual(await auditRows(), [
        [now, 'node', 'node.logout', a.id, 'p', { project: 'p', name: 'a' }],
      ]);
      assert.deepEqual(await stored(b.id), b);
    });
  });

  describe('by admins', () => {
    it('deletes a node by name within a project, audited with its actor', async () => {
      const a = await join('a');
      const other = await join('a', { project: 'q' });
      await assert.rejects(
        changes.delete('alice', 'a'),
        fails('invalid', /exists in several projects; add --project/),
      );
      const gone = await changes.delete('alice', 'a', 'q');
      assert.deepEqual(gone, other);
      assert.equal(nodes.get(other.id), undefined);
      assert.deepEqual(await stored(a.id), a);
      assert.deepEqual(seen(), [['node-removed', 'a']]);
      assert.deepEqual(await auditRows(), [
        [now, 'alice', 'node.delete', other.id, 'q', { project: 'q', name: 'a' }],
      ]);
    });

    it('expires a node and clears the expiry, stored, audited and announced', async () => {
      const a = await join('a');
      const expired = await changes.expire('alice', 'a', 'p', now + MINUTE);
      assert.deepEqual(expired, { ...a, expiresAt: now + MINUTE });
      assert.deepEqual(await stored(a.id), expired);
      const cleared = await changes.expire('bob', a.id, undefined, null);
      assert.equal(cleared.expiresAt, null);
      assert.equal((await stored(a.id))?.expiresAt, null);
      assert.deepEqual(seen(), [
        ['node-changed', 'a'],
        ['node-changed', 'a'],
      ]);
      assert.deepEqual(logged, [...nodeLogged(a), ...nodeLogged(a)]);
      assert.deepEqual(await auditRows(), [
        [now, 'alice', 'node.expire', a.id, 'p', { project: 'p', expiresAt: now + MINUTE }],
        [now, 'bob', 'node.expire', a.id, 'p', { project: 'p', expiresAt: null }],
      ]);
    });

    it('renames a node to a free DNS label of its project', async () => {
      const a = await join('a');
      await join('b');
      await join('c', { project: 'q' });
      await assert.rejects(
        changes.rename('alice', 'a', 'p', 'Not_A_Label'),
        fails('invalid', /^node name "Not_A_Label" must be a DNS label \(a-z, 0-9, -; at most 63\)$/),
      );
      await assert.rejects(
        changes.rename('alice', 'a', 'p', 'b'),
        fails('exists', /^project "p" already has a node named "b"$/),
      );
      assert.equal((await changes.rename('alice', 'a', 'p', 'a')).name, 'a', 'its own name');
      const renamed = await changes.rename('alice', 'a', 'p', 'c');
      assert.equal(renamed.name, 'c', 'a name taken in another project only');
      assert.deepEqual(await stored(a.id), renamed);
      assert.equal(nodes.resolve('c', 'p').id, a.id);
      assert.deepEqual((await auditRows()).at(-1), [
        now,
        'alice',
        'node.rename',
        a.id,
        'p',
        { project: 'p', name: 'c' },
      ]);
    });

    it('sets tags sorted and once each, and refuses what is not a tag', async () => {
      const a = await join('a');
      await assert.rejects(
        changes.setTags('alice', 'a', 'p', ['tag:ok', 'web']),
        fails('invalid', /^"web" is not a tag \(tag:NAME\)$/),
      );
      const tagged = await changes.setTags('alice', 'a', 'p', ['tag:web', 'tag:db', 'tag:web']);
      assert.deepEqual(tagged.tags, ['tag:db', 'tag:web']);
      assert.deepEqual((await stored(a.id))?.tags, ['tag:db', 'tag:web']);
      assert.deepEqual(seen(), [['node-changed', 'a']]);
      assert.deepEqual(await auditRows(), [
        [now, 'alice', 'node.tag', a.id, 'p', { project: 'p', tags: ['tag:db', 'tag:web'] }],
      ]);
    });

    it('approves only routes the node advertises', async () => {
      const r = await join('router', { routes: ['10.1.0.0/16', '10.2.0.0/16'] });
      await assert.rejects(
        changes.setRoutes('alice', 'router', 'p', ['10.1.0.0/16', '10.3.0.0/16', '10.4.0.0/16']),
        fails('precondition', /^node router does not advertise 10\.3\.0\.0\/16, 10\.4\.0\.0\/16$/),
      );
      const approved = await changes.setRoutes('alice', 'router', 'p', ['10.2.0.0/16']);
      assert.deepEqual(approved.approvedRoutes, ['10.2.0.0/16']);
      assert.deepEqual((await stored(r.id))?.approvedRoutes, ['10.2.0.0/16']);
      assert.deepEqual(await auditRows(), [
        [now, 'alice', 'node.routes', r.id, 'p', { project: 'p', approvedRoutes: ['10.2.0.0/16'] }],
      ]);
    });

    it('keeps concurrent changes to different fields, and does not bring back a node deleted meanwhile', async () => {
      const a = await join('a');
      await Promise.all([
        changes.rename('alice', 'a', 'p', 'renamed'),
        changes.setTags('bob', a.id, 'p', ['tag:x']),
      ]);
      assert.deepEqual([nodes.get(a.id)?.name, nodes.get(a.id)?.tags], ['renamed', ['tag:x']]);
      events.length = 0;
      const [, tagged] = await Promise.all([
        changes.delete('alice', a.id),
        changes.setTags('bob', a.id, 'p', ['tag:y']),
      ]);
      assert.deepEqual(tagged.tags, ['tag:y']);
      assert.equal(nodes.get(a.id), undefined);
      assert.deepEqual(seen(), [['node-removed', 'renamed']]);
    });
  });

  describe('applying rows another coordinator wrote', () => {
    it('adds, changes, patches and removes nodes as the rows say, and announces each once', async () => {
      const a = await join('a', { endpoints: ['192.0.2.1:1'] });
      const fresh = { ...nodeToRow(a), id: 'remote0000000001', machine_key: 'mk', node_key: nodeKey() };
      const added = {
        ...fresh,
        name: 'remote',
        numeric_id: 50,
        ip_index: 50,
        ipv4: '100.64.0.50',
        last_seen: null,
      };
      changes.applyRow(added.id, added);
      assert.deepEqual(nodes.get(added.id), nodeFromRow(added));
      assert.notEqual(pool.reserveFrom(50), 50, 'its address is taken');
      assert.deepEqual(seen(), [['node-added', 'remote']]);
      events.length = 0;
      changes.applyRow(added.id, added);
      assert.deepEqual(events, []);
      assert.equal(nodes.get(added.id)?.lastSeen, null, 'seen nowhere yet');

      events.length = 0;
      changes.applyRow(a.id, nodeToRow(a));
      changes.applyRow(a.id, { ...nodeToRow(a), last_seen: a.createdAt - 1 });
      assert.deepEqual(events, [], 'the same node, or one seen earlier: nothing');
      assert.equal(nodes.get(a.id)?.lastSeen, a.lastSeen);

      changes.applyRow(a.id, { ...nodeToRow(a), last_seen: a.createdAt + 5, endpoints: '["192.0.2.9:9"]' });
      const patched = nodes.get(a.id)!;
      assert.deepEqual([patched.lastSeen, patched.endpoints], [a.createdAt + 5, ['192.0.2.9:9']]);
      assert.deepEqual(events, [{ type: 'node-patched', node: patched, endpointsChanged: true }]);

      events.length = 0;
      changes.applyRow(a.id, { ...nodeToRow(patched), last_seen: null, tags: '["tag:x"]' });
      assert.deepEqual(nodes.get(a.id)?.tags, ['tag:x']);
      assert.equal(nodes.get(a.id)?.lastSeen, a.createdAt + 5, 'last seen never goes back');
      assert.deepEqual(seen(), [['node-changed', 'a']]);

      events.length = 0;
      changes.applyRow(a.id, undefined);
      changes.applyRow('unknown', undefined);
      assert.equal(nodes.get(a.id), undefined);
      assert.equal(pool.reserveFrom(a.ipIndex), a.ipIndex, 'its address is free');
      assert.deepEqual(seen(), [['node-removed', 'a']]);
    });
  });
});

describe('ephemeral nodes', () => {
  it('are reaped once offline for longer than the timeout, audited as the reaper', async () => {
    const store = await openStore({ url: ':memory:' });
    let now = 1_800_000_000_000;
    const state = await State.load(store.db, { ephemeralTimeoutMs: MINUTE, now: () => now });
    try {
      await state.createProject('test', 'p');
      const join = async (hostname: string, ephemeral: boolean) => {
        const { key } = await state.keys.createAuthKey('test', {
          project: 'p',
          reusable: false,
          ephemeral,
          expiresInMs: 10 * MINUTE,
          tags: [],
          reason: '',
        });
        return (await state.register(registerInput(key, hostname))).node;
      };
      const ci = await join('ci', true);
      const online = await join('online', true);
      await join('kept', false);
      state.setOnline(online.id, true);
      now += MINUTE;
      assert.deepEqual(await state.reapEphemeral(), [], 'not longer than the timeout yet');
      now += 1;
      assert.deepEqual(
        (await state.reapEphemeral()).map((n) => n.name),
        ['ci'],
      );
      assert.deepEqual(
        state.listNodes('p').map((n) => n.name),
        ['kept', 'online'],
      );
      const audit = await state.auditLog({ projects: ['p'], since: null, limit: 10 });
      assert.deepEqual(
        audit.filter((e) => e.action.startsWith('node.')).map((e) => [e.actor, e.action, e.target]),
        [['reaper', 'node.reap', ci.id]],
      );
    } finally {
      await state.close();
      await store.close();
    }
  });
});
