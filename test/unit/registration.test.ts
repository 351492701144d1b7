// Registration as a joining or returning machine sees it: the node it gets
// (addresses, name, tags, expiry), the refusals and their messages, what is
// stored and announced, and what a failed or raced registration leaves
// behind. The second part builds the registration from its parts to reach
// what only coordinators sharing a database do (address turns, retries
// after a collision with another coordinator).
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it, mock } from 'node:test';
import { unshared } from '../../coordinator/state/changelog.js';
import { Counters } from '../../coordinator/state/counters.js';
import { CoordinatorError } from '../../coordinator/state/errors.js';
import { EventBus } from '../../coordinator/state/events.js';
import { AddressPool } from '../../coordinator/state/ipam.js';
import { KeyStore } from '../../coordinator/state/keys.js';
import { NodeChanges } from '../../coordinator/state/node-changes.js';
import { NodeIndex } from '../../coordinator/state/node-index.js';
import { Presence } from '../../coordinator/state/presence.js';
import { Projects } from '../../coordinator/state/projects.js';
import { type NodeRecord, nodeToRow } from '../../coordinator/state/records.js';
import { Registration } from '../../coordinator/state/registration.js';
import { parseSecret } from '../../coordinator/state/secrets.js';
import { type RegisterInput, State, type StateEvent } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { encodeWgKey, generateMachineKey, generateNodeKey } from '../../proto/keys.js';
import { registerInput, testAuthKey } from '../fixtures/nodes.js';

const MINUTE = 60_000;

const machineKey = () => Buffer.from(generateMachineKey().publicKey).toString('hex');
const nodeKey = () => encodeWgKey(generateNodeKey().publicKey);

const fails =
  (kind: CoordinatorError['kind'], re: RegExp, reason?: CoordinatorError['reason']) => (err: unknown) => {
    assert.ok(err instanceof CoordinatorError, String(err));
    assert.equal(err.kind, kind);
    assert.match(err.message, re);
    assert.equal(err.reason, reason);
    return true;
  };

const keyId = (text: string) => parseSecret('auth', text)!.id;

/** A node as the store holds it, written by "another coordinator": the state does not know it. */
const foreignRow = (project: string, key: string, index: number) => {
  const node: NodeRecord = {
    id: 'f0f0f0f0f0f0f0f0',
    numericId: 900,
    project,
    name: 'elsewhere',
    machineKey: machineKey(),
    nodeKey: key,
    ipv4: `100.64.3.${index}`,
    ipv6: `fd7a:115c:a1e0::3${index}`,
    ipIndex: 768 + index,
    tags: [],
    ephemeral: false,
    authKeyId: 'k',
    hostname: 'elsewhere',
    os: 'linux',
    version: '1',
    endpoints: [],
    advertisedRoutes: [],
    approvedRoutes: [],
    createdAt: 1,
    lastSeen: null,
    expiresAt: null,
    keySetAt: 1,
    lockdownPorts: [],
  };
  return nodeToRow(node);
};

describe('registration through the state', () => {
  let store: Store;
  let state: State;
  let now: number;
  let events: StateEvent[];

  const load = () => State.load(store.db, { ephemeralTimeoutMs: MINUTE, now: () => now });
  const authKey = async (
    opts: { tags?: string[]; reusable?: boolean; ephemeral?: boolean; project?: string } = {},
  ) => {
    const project = opts.project ?? 'p';
    if (!state.listProjects().some((p) => p.name === project)) await state.createProject('test', project);
    return testAuthKey(state.keys, project, opts);
  };
  const usedCount = async (key: string) =>
    (await state.keys.listAuthKeys('p')).find((k) => k.id === keyId(key))?.usedCount;
  const seen = () => events.map((e) => [e.type, 'node' in e ? e.node.name : '']);

  beforeEach(async () => {
    now = 1_800_000_000_000;
    store = await openStore({ url: ':memory:' });
    state = await load();
    events = [];
    state.onEvent((e) => events.push(e));
  });
  afterEach(async () => {
    await state.close();
    await store.close();
  });

  it('gives a new machine a node with the next addresses and the key’s tags, stores it and announces it', async () => {
    const key = await authKey({ tags: ['tag:web', 'tag:ops'] });
    const input = registerInput(key, 'Web_01.dc1.example', {
      os: 'freebsd',
      version: '1.2.3',
      endpoints: ['192.0.2.1:41641'],
      advertisedRoutes: ['10.1.0.0/16'],
    });
    const { node, existing } = await state.register(input);
    assert.equal(existing, false);
    assert.match(node.id, /^[0-9a-f]{16}$/);
    assert.deepEqual(
      { ...node, id: '' },
      {
        id: '',
        numericId: 1,
        project: 'p',
        name: 'web-01',
        machineKey: input.machineKey,
        nodeKey: input.nodeKey,
        ipv4: '100.64.0.1',
        ipv6: 'fd7a:115c:a1e0::1',
        ipIndex: 1,
        tags: ['tag:ops', 'tag:web'],
        ephemeral: false,
        authKeyId: keyId(key),
        hostname: 'Web_01.dc1.example',
        os: 'freebsd',
        version: '1.2.3',
        endpoints: ['192.0.2.1:41641'],
        advertisedRoutes: ['10.1.0.0/16'],
        approvedRoutes: [],
        createdAt: now,
        lastSeen: now,
        expiresAt: null,
        keySetAt: now,
        lockdownPorts: [],
      },
    );
    assert.deepEqual(events, [{ type: 'node-added', node }]);
    assert.equal(await usedCount(key), 1);

    const reloaded = await load();
    assert.deepEqual(reloaded.getNode(node.id), node, 'stored as it was given out');
    const { node: second } = await reloaded.register(registerInput(await authKey(), 'second'));
    assert.deepEqual(
      [second.numericId, second.ipv4, second.ipv6],
      [2, '100.64.0.2', 'fd7a:115c:a1e0::2'],
      'numbers and addresses go on after a restart',
    );
  });

  it('names a node after its hostname, with a suffix when taken and "node" when nothing of it is a label', async () => {
    const name = async (hostname: string) =>
      (await state.register(registerInput(await authKey(), hostname))).node.name;
    assert.equal(await name('db'), 'db');
    assert.equal(await name('db.other.example'), 'db-2');
    assert.equal(await name('__'), 'node');
    assert.equal(await name(''), 'node-2');
  });

  it('gives an ephemeral key’s machines ephemeral nodes', async () => {
    const { node } = await state.register(registerInput(await authKey({ ephemeral: true }), 'ci'));
    assert.equal(node.ephemeral, true);
    assert.equal((await load()).getNode(node.id)?.ephemeral, true);
  });

  it('takes the requested tags the key allows, sorted and once each, and refuses the others', async () => {
    const key = await authKey({ tags: ['tag:a', 'tag:b', 'tag:c'], reusable: true });
    const { node } = await state.register(
      registerInput(key, 'x', { requestedTags: ['tag:b', 'tag:a', 'tag:b'] }),
    );
    assert.deepEqual(node.tags, ['tag:a', 'tag:b']);
    await assert.rejects(
      state.register(registerInput(key, 'y', { requestedTags: ['tag:a', 'tag:d'] })),
      fails(
        'denied',
        new RegExp(`^auth key ${keyId(key)} does not allow tag:d \\(it allows: tag:a, tag:b, tag:c\\)$`),
      ),
    );
    await assert.rejects(
      state.register(registerInput(key, 'y', { requestedTags: ['a'] })),
      fails('invalid', /^"a" is not a tag \(tag:NAME\)$/),
    );
    const plain = await authKey();
    await assert.rejects(
      state.register(registerInput(plain, 'z', { requestedTags: ['tag:a'] })),
      fails('denied', /does not allow tag:a \(it allows: no tags\)$/),
    );
    assert.equal(await usedCount(plain), 0, 'a refused registration does not spend the key');
    assert.deepEqual(
      state.listNodes('p').map((n) => n.name),
      ['x'],
    );
  });

  it('refuses a machine without an auth key, telling an unknown machine from an expired node', async () => {
    await assert.rejects(
      state.register(registerInput('', 'new')),
      fails('unauthenticated', /^an auth key is required to register a new machine$/, 'node-unknown'),
    );
    const input = registerInput(await authKey(), 'old');
    await state.register(input);
    await state.expireNode('test', 'old', 'p', now);
    await assert.rejects(
      state.register({ ...input, authKey: '' }),
      fails('unauthenticated', /^node old has expired; register again with a new auth key$/, 'node-expired'),
    );
    await assert.rejects(
      state.register({ ...input, authKey: await authKey({ project: 'q' }) }),
      fails('denied', /^auth key \w+ belongs to another project than node old$/),
    );
  });

  it('expires a node at its time to the millisecond', async () => {
    const input = registerInput(await authKey(), 'a');
    await state.register(input);
    await state.expireNode('test', 'a', 'p', now + 1);
    assert.equal((await state.register({ ...input, authKey: '' })).existing, true, 'before its time');
    now += 1;
    await assert.rejects(
      state.register({ ...input, authKey: '' }),
      fails('unauthenticated', /has expired/, 'node-expired'),
    );
  });

  it('gives an expired node re-authorized with a fresh key its identity and addresses back, with the new key’s tags', async () => {
    const input = registerInput(await authKey({ tags: ['tag:old'] }), 'a');
    const { node } = await state.register(input);
    await state.register(registerInput(await authKey(), 'b'));
    await state.expireNode('test', 'a', 'p', now);
    now += MINUTE / 2;
    events.length = 0;
    const fresh = await authKey({ tags: ['tag:new', 'tag:more'] });
    const back = await state.register({ ...input, authKey: fresh, requestedTags: ['tag:new'] });
    assert.equal(back.existing, true);
    const expected = { ...node, expiresAt: null, tags: ['tag:new'] };
    assert.deepEqual(
      back.node,
      expected,
      'same id, name, addresses and node key; key kept since registration',
    );
    assert.deepEqual(seen(), [['node-added', 'a']], 'peers take it back');
    assert.deepEqual(state.getNode(node.id), expected);
    assert.deepEqual((await load()).getNode(node.id), expected);
    assert.equal(await usedCount(fresh), 1);
    assert.equal(
      (await state.register({ ...input, authKey: '' })).existing,
      true,
      'it reconnects without a key',
    );

    await state.expireNode('test', 'a', 'p', now);
    now += 1;
    const rotated = nodeKey();
    const again = await state.register({ ...input, authKey: await authKey(), nodeKey: rotated });
    assert.deepEqual([again.node.nodeKey, again.node.keySetAt, again.node.tags], [rotated, now, []]);
    assert.equal((await load()).getNode(node.id)?.nodeKey, rotated);
  });

  it('writes and announces only what a reconnecting machine changed', async () => {
    let input = registerInput(await authKey(), 'a', { endpoints: ['192.0.2.1:1'] });
    const { node } = await state.register(input);
    events.length = 0;
    const again = await state.register({ ...input, authKey: '' });
    assert.deepEqual(again, { node, existing: true });
    assert.deepEqual(events, [], 'nothing changed, nothing announced');

    const changes: [string, Partial<RegisterInput>][] = [
      ['hostname', { hostname: 'renamed.example' }],
      ['os', { os: 'openbsd' }],
      ['version', { version: '2.0.0' }],
      ['advertised routes', { advertisedRoutes: ['10.2.0.0/16'] }],
      ['node key', { nodeKey: nodeKey() }],
    ];
    for (const [what, change] of changes) {
      now += 1_000;
      events.length = 0;
      input = { ...input, ...change };
      const { node: changed, existing } = await state.register({ ...input, authKey: '' });
      assert.equal(existing, true);
      assert.deepEqual(seen(), [['node-changed', 'a']], what);
      for (const [field, value] of Object.entries(change))
        assert.deepEqual(changed[field as keyof NodeRecord], value, what);
      assert.deepEqual((await load()).getNode(node.id), changed, `${what} is stored`);
    }
    const last = state.getNode(node.id)!;
    assert.equal(last.name, 'a', 'a new hostname does not rename the node');
    assert.equal(last.keySetAt, now, 'a new node key is dated');
    now += 1_000;
    input = { ...input, version: '3' };
    assert.equal(
      (await state.register({ ...input, authKey: '' })).node.keySetAt,
      last.keySetAt,
      'the same key keeps its date',
    );

    events.length = 0;
    const moved = await state.register({ ...input, authKey: '', endpoints: ['192.0.2.9:2'] });
    assert.deepEqual(moved.node.endpoints, ['192.0.2.9:2']);
    assert.deepEqual(events, [{ type: 'node-patched', node: moved.node, endpointsChanged: true }]);
    assert.deepEqual((await load()).getNode(node.id)?.endpoints, ['192.0.2.9:2']);
    events.length = 0;
    const quiet = await state.register({ ...input, authKey: '', endpoints: [] });
    assert.deepEqual(quiet.node.endpoints, ['192.0.2.9:2'], 'no endpoints reported: the known ones stay');
    assert.deepEqual(events, []);
  });

  it('refuses a node key another node holds, in memory or only in the store, and frees it again', async () => {
    const a = registerInput(await authKey(), 'a');
    const { node } = await state.register(a);
    const { node: b } = await state.register(registerInput(await authKey(), 'b'));
    await assert.rejects(
      state.register({ ...a, authKey: '', nodeKey: b.nodeKey }),
      fails('exists', /^node key is already used by another node; generate a new node key$/),
    );

    const taken = nodeKey();
    await store.db
      .insertInto('nodes')
      .values(foreignRow('p', taken, 1))
      .execute();
    await assert.rejects(
      state.register({ ...a, authKey: '', nodeKey: taken, version: '2' }),
      fails('exists', /node key is already used by another node/),
    );
    assert.deepEqual(state.getNode(node.id), node, 'unchanged');
    await state.expireNode('test', 'a', 'p', now);
    const fresh = await authKey();
    await assert.rejects(
      state.register({ ...a, authKey: fresh, nodeKey: taken }),
      fails('exists', /node key is already used by another node/),
    );
    assert.equal(await usedCount(fresh), 0, 'the failed re-authorization did not spend the key');
    assert.equal(state.getNode(node.id)?.expiresAt, now, 'still expired');

    await store.db.deleteFrom('nodes').where('id', '=', 'f0f0f0f0f0f0f0f0').execute();
    const rotated = await state.rotateNodeKey(b.id, taken);
    assert.equal(rotated.nodeKey, taken, 'the failed registrations did not keep the key for themselves');
  });

  it('lets exactly one of several machines racing for a single-use key join; the others leave nothing', async () => {
    const key = await authKey();
    const racers = Array.from({ length: 4 }, () => registerInput(key, 'racer'));
    const results = await Promise.allSettled(racers.map((r) => state.register(r)));
    const joined = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value.node] : []));
    assert.equal(joined.length, 1);
    for (const r of results)
      if (r.status === 'rejected')
        fails(
          'unauthenticated',
          /^auth key \w+ is single-use and was already used by another machine$/,
        )(r.reason);
    const winner = joined[0]!;
    assert.deepEqual(state.listNodes('p'), [winner]);
    assert.deepEqual(seen(), [['node-added', winner.name]]);
    assert.equal(await usedCount(key), 1);
    const loser = racers.find((r) => r.machineKey !== winner.machineKey)!;
    const later = await state.register({ ...loser, authKey: await authKey() });
    assert.equal(later.existing, false, 'the machine is new to the coordinator');
    assert.equal(state.listNodes('p').length, 2);
  });

  it('gives one machine registering twice at once one node', async () => {
    const input = registerInput(await authKey({ reusable: true }), 'twice');
    const [one, two] = await Promise.all([state.register(input), state.register(input)]);
    assert.equal(one.node.id, two.node.id);
    assert.deepEqual([one.existing, two.existing].sort(), [false, true]);
    assert.deepEqual(
      state.listNodes('p').map((n) => n.name),
      ['twice'],
    );
  });
});

describe('registration on a database shared with other coordinators', () => {
  let store: Store;
  let now: number;
  /** What a Registration is built from, without `catchUp` unless a test adds it. */
  let parts: Required<Omit<ConstructorParameters<typeof Registration>[1], 'catchUp'>>;

  beforeEach(async () => {
    now = 1_800_000_000_000;
    store = await openStore({ url: ':memory:' });
    const clock = () => now;
    const nodes = new NodeIndex();
    const events = new EventBus();
    const counters = new Counters(store.db, true);
    const projects = new Projects(store.db, clock, counters, nodes, events, unshared);
    const pool = new AddressPool([]);
    const presence = new Presence(store.db, clock, nodes, events);
    parts = {
      nodes,
      projects,
      keys: new KeyStore(store.db, clock, (name) => projects.require(name)),
      counters,
      pool,
      changes: new NodeChanges(store.db, clock, nodes, pool, presence, events, unshared),
      events,
    };
    await projects.create('test', 'p');
  });
  afterEach(async () => {
    mock.restoreAll();
    await store.close();
  });

  const authKey = (reusable = false) => testAuthKey(parts.keys, 'p', { reusable });
  const registration = (catchUp?: () => Promise<void>) => new Registration(() => now, { ...parts, catchUp });
  /** How PostgreSQL refuses a row that breaks a unique index. */
  const collision = (index: string) =>
    Object.assign(new Error(`duplicate key value violates unique constraint "${index}"`), { code: '23505' });
  /** The next `n` writes of nodes fail with `err`. */
  const failWrites = (n: number, err: Error) => {
    const write = parts.changes.write.bind(parts.changes);
    let calls = 0;
    mock.method(parts.changes, 'write', async (...args: Parameters<NodeChanges['write']>) => {
      calls++;
      if (calls <= n) throw err;
      return write(...args);
    });
    return () => calls;
  };

  it('takes numbers and the address turn from the database', async () => {
    await store.db.updateTable('id_counters').set({ last: 41 }).where('name', '=', 'addresses').execute();
    await store.db.updateTable('id_counters').set({ last: 7 }).where('name', '=', 'nodes').execute();
    const { node } = await registration().register(registerInput(await authKey(), 'a'));
    assert.deepEqual(
      [node.numericId, node.ipIndex, node.ipv4, node.ipv6],
      [8, 42, '100.64.0.42', 'fd7a:115c:a1e0::2a'],
    );
    const counters = await store.db.selectFrom('id_counters').selectAll().orderBy('name').execute();
    assert.deepEqual(
      counters.map((c) => [c.name, Number(c.last)]),
      [
        ['addresses', 42],
        ['nodes', 8],
        ['projects', 1],
      ],
    );
  });

  it('catches up and tries again after colliding with another coordinator’s registration', async () => {
    mock.method(Math, 'random', () => 0);
    const other = foreignRow('p', nodeKey(), 1);
    let caughtUp = 0;
    const catchUp = async () => {
      caughtUp++;
      await store.db.insertInto('nodes').values(other).execute();
      parts.changes.applyRow(other.id, other);
    };
    const writes = failWrites(1, collision('nodes_project_name_key'));
    const input = registerInput(await authKey(), 'elsewhere');
    const { node, existing } = await registration(catchUp).register(input);
    assert.equal(existing, false);
    assert.equal(caughtUp, 1);
    assert.equal(writes(), 2);
    assert.equal(node.name, 'elsewhere-2', 'the name the other coordinator took is not given twice');
    assert.deepEqual(
      parts.nodes
        .projectNodes('p')
        .map((n) => n.name)
        .sort(),
      ['elsewhere', 'elsewhere-2'],
    );
    assert.equal(parts.pool.reserveFrom(1), 1, 'the address of the failed attempt is free again');
  });

  it('gives up after ten attempts with the last collision', async () => {
    mock.method(Math, 'random', () => 0);
    let caughtUp = 0;
    const err = collision('nodes_ipv4_key');
    const writes = failWrites(100, err);
    const input = registerInput(await authKey(), 'a');
    await assert.rejects(
      registration(async () => {
        caughtUp++;
      }).register(input),
      (e) => e === err,
    );
    assert.deepEqual([writes(), caughtUp], [10, 9]);
    assert.equal(parts.nodes.byMachine(input.machineKey), undefined, 'nothing is left behind');
  });

  it('does not try again after a refusal, a node key collision, or without other coordinators', async () => {
    let caughtUp = 0;
    const catchUp = async () => {
      caughtUp++;
    };
    await assert.rejects(
      registration(catchUp).register(registerInput('mgkey_auth_unknown', 'a')),
      (e) => e instanceof CoordinatorError && e.kind === 'unauthenticated',
    );
    failWrites(1, collision('nodes_node_key'));
    await assert.rejects(
      registration(catchUp).register(registerInput(await authKey(), 'a')),
      fails('exists', /^node key is already used by another node; generate a new node key$/),
    );
    assert.equal(caughtUp, 0);

    mock.restoreAll();
    const lost = Object.assign(new Error('terminating connection due to administrator command'), {
      code: '57P01',
    });
    failWrites(1, lost);
    await assert.rejects(
      registration(catchUp).register(registerInput(await authKey(), 'a')),
      (e) => e === lost,
    );
    assert.equal(caughtUp, 0, 'a store that fails is not a collision');

    const err = collision('nodes_ipv4_key');
    mock.restoreAll();
    failWrites(1, err);
    await assert.rejects(registration().register(registerInput(await authKey(), 'a')), (e) => e === err);
  });

  it('refuses a key of a project another coordinator deleted', async () => {
    const key = await authKey();
    parts.projects.applyRow('p', undefined);
    await assert.rejects(
      registration().register(registerInput(key, 'a')),
      fails('unauthenticated', new RegExp(`^auth key ${keyId(key)} belongs to a deleted project$`)),
    );
  });
});
