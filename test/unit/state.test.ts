// Admin changes to the coordinator's state: projects, tags, routes, expiry,
// policy checks, desired versions and auth key listings. Each test checks
// what an admin sees and what the mesh sees (events, compiled policy).
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { CoordinatorError } from '../../coordinator/state/errors.js';
import { parseSecret } from '../../coordinator/state/secrets.js';
import { type RegisterInput, State, type StateEvent } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { encodeWgKey, generateMachineKey, generateNodeKey } from '../../proto/keys.js';
import { registerInput, testAuthKey } from '../fixtures/nodes.js';

const MINUTE = 60_000;
const TAGS = '"tagOwners":{"tag:ops":[],"tag:firewall":[],"tag:router":[]}';

describe('state: admin changes', () => {
  let store: Store;
  let state: State;
  let now = 1_800_000_000_000;
  let events: StateEvent[];

  beforeEach(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: MINUTE, now: () => now });
    events = [];
    state.onEvent((e) => events.push(e));
  });
  afterEach(async () => {
    await state.close();
    await store.close();
  });

  const fails = (kind: CoordinatorError['kind'], re: RegExp) => (err: unknown) => {
    assert.ok(err instanceof CoordinatorError, String(err));
    assert.equal(err.kind, kind);
    assert.match(err.message, re);
    return true;
  };
  const input = async (
    project: string,
    hostname: string,
    opts: { tags?: string[]; routes?: string[]; reusable?: boolean } = {},
  ): Promise<RegisterInput> => {
    if (!state.listProjects().some((p) => p.name === project)) await state.createProject('test', project);
    const { key } = await state.keys.createAuthKey('test', {
      project,
      reusable: opts.reusable ?? false,
      ephemeral: false,
      expiresInMs: MINUTE,
      tags: opts.tags ?? [],
      reason: 'for a test',
    });
    return {
      authKey: key,
      machineKey: Buffer.from(generateMachineKey().publicKey).toString('hex'),
      nodeKey: encodeWgKey(generateNodeKey().publicKey),
      hostname,
      os: 'linux',
      version: '1.0.0',
      requestedTags: [],
      endpoints: [],
      advertisedRoutes: opts.routes ?? [],
    };
  };
  const join = async (project: string, hostname: string, opts: Parameters<typeof input>[2] = {}) =>
    (await state.register(await input(project, hostname, opts))).node;

  it('deletes a project only when empty or forced, with its nodes and keys, also after a restart', async () => {
    const a = await join('gone', 'a');
    const spare = await input('gone', 'later');
    await join('kept', 'k');
    await assert.rejects(
      state.deleteProject('test', 'gone', false),
      fails('precondition', /still has 1 node\(s\); delete them first or use --force/),
    );
    events.length = 0;
    await state.deleteProject('test', 'gone', true);
    assert.deepEqual(
      events.map((e) => [e.type, 'node' in e ? e.node.id : '']),
      [['node-removed', a.id]],
    );
    assert.deepEqual(
      state.listProjects().map((p) => p.name),
      ['kept'],
    );
    assert.equal(state.getNode(a.id), undefined);
    await assert.rejects(state.register(spare), fails('unauthenticated', /unknown auth key/));
    await assert.rejects(state.deleteProject('test', 'gone', true), fails('not-found', /does not exist/));

    const reloaded = await State.load(store.db, { ephemeralTimeoutMs: MINUTE, now: () => now });
    assert.deepEqual(
      reloaded.listNodes().map((n) => n.name),
      ['k'],
    );
    await state.createProject('test', 'gone');
    assert.deepEqual(state.listNodes('gone'), [], 'a project made again under the name starts empty');
  });

  it('sets tags, and the policy follows them', async () => {
    const policy = `{${TAGS},"acls":[{"action":"accept","src":["tag:ops"],"dst":["tag:firewall:22"]}]}`;
    const ops = await join('p', 'ops', { tags: ['tag:ops'] });
    const other = await join('p', 'other');
    await state.setPolicy('test', 'p', policy);
    assert.equal(state.compiled('p').canSee(ops.id, other.id), false);
    await assert.rejects(
      state.setNodeTags('test', 'other', 'p', ['firewall']),
      fails('invalid', /"firewall" is not a tag/),
    );
    events.length = 0;
    const tagged = await state.setNodeTags('test', 'other', 'p', ['tag:firewall', 'tag:firewall', 'tag:a']);
    assert.deepEqual(tagged.tags, ['tag:a', 'tag:firewall'], 'sorted, without repeats');
    assert.deepEqual(
      events.map((e) => e.type),
      ['node-changed'],
    );
    assert.equal(state.compiled('p').canSee(ops.id, other.id), true, 'now a firewall: ops sees it');
    assert.deepEqual(
      state
        .compiled('p')
        .filterFor(other.id)
        .flatMap((r) => r.ports.map((x) => x.first)),
      [22],
    );
  });

  it('approves only advertised routes, and a route rule opens on its router', async () => {
    const policy = `{${TAGS},"acls":[{"action":"accept","src":["tag:ops"],"dst":["10.1.0.0/16:22"]}]}`;
    const ops = await join('p', 'ops', { tags: ['tag:ops'] });
    const router = await join('p', 'router', { routes: ['10.1.0.0/16', '10.2.0.0/16'] });
    await state.setPolicy('test', 'p', policy);
    assert.equal(state.compiled('p').canSee(ops.id, router.id), false, 'no route approved yet');
    await assert.rejects(
      state.setNodeRoutes('test', 'router', 'p', ['10.1.0.0/16', '192.168.0.0/24']),
      fails('precondition', /node router does not advertise 192\.168\.0\.0\/24/),
    );
    const approved = await state.setNodeRoutes('test', 'router', 'p', ['10.1.0.0/16']);
    assert.deepEqual(approved.approvedRoutes, ['10.1.0.0/16']);
    assert.equal(state.compiled('p').canSee(ops.id, router.id), true, 'the router is visible to ops');
    const rules = state.compiled('p').filterFor(router.id);
    assert.deepEqual(
      rules.map((r) => [r.dstCidrs, r.ports.map((x) => x.first)]),
      [[['10.1.0.0/16'], [22]]],
    );
    await state.setNodeRoutes('test', 'router', 'p', []);
    assert.equal(state.compiled('p').canSee(ops.id, router.id), false, 'withdrawn again');
  });

  it('expires a node at a time to come, announces it when the sweep passes that time, and clears it', async () => {
    const a = await join('p', 'a');
    const b = await join('p', 'b');
    const expired = await state.expireNode('test', 'b', 'p', now + MINUTE);
    assert.equal(expired.expiresAt, now + MINUTE);
    assert.deepEqual(
      state.activeProjectNodes('p').map((n) => n.name),
      ['a', 'b'],
      'still active before its time',
    );
    events.length = 0;
    now += MINUTE - 1;
    state.sweepExpiry();
    assert.equal(events.length, 0, 'nothing to announce before the time');
    now += 1;
    state.sweepExpiry();
    assert.deepEqual(
      events.map((e) => [e.type, 'node' in e ? e.node.id : '']),
      [['node-changed', b.id]],
    );
    assert.equal(state.compiled('p').canSee(a.id, b.id), false, 'peers drop it');
    state.sweepExpiry();
    assert.equal(events.length, 1, 'announced once');
    await assert.rejects(
      state.register({ ...(await input('p', 'b')), machineKey: b.machineKey, authKey: '' }),
      fails('unauthenticated', /node b has expired; register again with a new auth key/),
    );
    await state.expireNode('test', b.id, undefined, null);
    assert.equal(state.compiled('p').canSee(a.id, b.id), true, 'cleared: back in the mesh');
  });

  it('checks the stored policy or a given one against the nodes there are', async () => {
    await join('p', 'ops', { tags: ['tag:ops'] });
    await join('p', 'fw', { tags: ['tag:firewall'] });
    assert.throws(() => state.checkPolicy('p', undefined), fails('precondition', /has no policy to check/));
    const stored = `{${TAGS},"acls":[{"action":"accept","src":["tag:ops"],"dst":["tag:firewall:22"]}],
      "tests":[{"src":"ops","accept":["fw:22"],"deny":["fw:80"]}]}`;
    await state.setPolicy('test', 'p', stored);
    assert.deepEqual(
      state.checkPolicy('p', undefined).map((o) => [o.dst, o.passed]),
      [
        ['fw:22', true],
        ['fw:80', true],
      ],
    );
    const proposed = stored.replace('tag:firewall:22', 'tag:firewall:80');
    assert.deepEqual(
      state.checkPolicy('p', proposed).map((o) => [o.dst, o.passed]),
      [
        ['fw:22', false],
        ['fw:80', false],
      ],
      'a proposed policy is checked without being stored',
    );
    assert.equal(state.getPolicy('p')?.source, stored);
    assert.throws(() => state.checkPolicy('p', '{ "acls": 1 }'), fails('invalid', /acls/));
    assert.throws(() => state.checkPolicy('nope', undefined), fails('not-found', /does not exist/));
  });

  it('picks the desired version by tag, then by project, and lists the nodes that drift', async () => {
    const ops = await join('p', 'ops', { tags: ['tag:ops'] });
    const plain = await join('p', 'plain');
    await join('q', 'elsewhere');
    assert.equal(state.desiredVersionFor(ops), '');
    events.length = 0;
    await state.setDesiredVersion('test', 'p', '', '1.0.0');
    await state.setDesiredVersion('test', 'p', 'tag:ops', '2.0.0');
    assert.deepEqual(
      events.map((e) => e.type),
      ['versions-changed', 'versions-changed'],
    );
    assert.equal(state.desiredVersionFor(ops), '2.0.0', 'the tag wins');
    assert.equal(state.desiredVersionFor(plain), '1.0.0', 'else the project');
    assert.deepEqual(
      state.driftingNodes().map((n) => n.name),
      ['ops'],
      'plain runs 1.0.0 already; q has no desired version',
    );
    assert.deepEqual(
      state.listDesiredVersions('p').map((v) => [v.tag, v.version]),
      [
        ['', '1.0.0'],
        ['tag:ops', '2.0.0'],
      ],
    );
    await state.setDesiredVersion('test', 'p', 'tag:ops', '');
    assert.equal(state.desiredVersionFor(ops), '1.0.0', 'removed: back to the project version');
    assert.deepEqual(state.driftingNodes('p'), []);
    await assert.rejects(state.setDesiredVersion('test', 'p', 'ops', '1'), fails('invalid', /not a tag/));
    await assert.rejects(
      state.setDesiredVersion('test', 'p', '', '1 .0'),
      fails('invalid', /at most 64 characters without spaces/),
    );
    const reloaded = await State.load(store.db, { ephemeralTimeoutMs: MINUTE, now: () => now });
    assert.equal(reloaded.desiredVersionFor(ops), '1.0.0', 'kept across a restart');
  });

  it('lists the auth keys of a project with their uses, and expires them', async () => {
    const k = await input('p', 'a', { reusable: true });
    await state.register(k);
    await state.register({
      ...k,
      machineKey: Buffer.from(generateMachineKey().publicKey).toString('hex'),
      nodeKey: encodeWgKey(generateNodeKey().publicKey),
    });
    await input('q', 'elsewhere');
    const [listed] = await state.keys.listAuthKeys('p');
    assert.ok(listed && parseSecret('auth', k.authKey)?.id === listed.id);
    assert.deepEqual(
      { ...listed, id: '' },
      {
        id: '',
        project: 'p',
        reusable: true,
        ephemeral: false,
        tags: [],
        reason: 'for a test',
        createdAt: now,
        expiresAt: now + MINUTE,
        usedCount: 2,
        revokedAt: null,
      },
    );
    assert.equal((await state.keys.listAuthKeys('p')).length, 1, "q's key is not listed");
    const expired = await state.keys.expireAuthKey('test', listed.id);
    assert.equal(expired.revokedAt, now);
    await assert.rejects(state.keys.listAuthKeys('nope'), fails('not-found', /does not exist/));
  });
});

describe('state: lookups, presence and lifecycle', () => {
  let store: Store;
  let state: State;
  let now = 1_800_000_000_000;
  let events: StateEvent[];
  const keyOf = (project: string, opts: { tags?: string[]; ephemeral?: boolean } = {}) =>
    testAuthKey(state.keys, project, opts);
  const join = async (
    project: string,
    hostname: string,
    opts: { tags?: string[]; ephemeral?: boolean } = {},
  ) =>
    (
      await state.register(
        registerInput(await keyOf(project, opts), hostname, {
          version: '1.0.0',
          endpoints: ['192.0.2.10:41641'],
        }),
      )
    ).node;

  beforeEach(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: MINUTE, now: () => now });
    await state.createProject('test', 'p');
    await state.createProject('test', 'q');
    events = [];
    state.onEvent((e) => events.push(e));
  });
  afterEach(async () => {
    await state.close();
    await store.close();
  });

  it('finds projects and nodes by name, machine key and reference', async () => {
    const a = await join('p', 'a');
    await join('q', 'a');
    assert.equal(state.getProject('p')?.name, 'p');
    assert.equal(state.getProject('nope'), undefined);
    assert.equal(state.nodeByMachineKey(a.machineKey)?.id, a.id);
    assert.equal(state.resolveNode('a', 'p').id, a.id, 'the project tells names apart');
    assert.equal(state.resolveNode(a.id).id, a.id);
    assert.deepEqual(
      state.listNodes('p').map((n) => [n.project, n.name]),
      [['p', 'a']],
    );
    assert.throws(() => state.listNodes('nope'), /project "nope" does not exist/);
  });

  it('counts nodes online here, tells recorders, and keeps where a node was seen from', async () => {
    const a = await join('p', 'a');
    const b = await join('p', 'b');
    const told: [string, boolean][] = [];
    state.recordPresence({ streaming: (id, online) => told.push([id, online]) });
    assert.equal(state.onlineCount(), 0);
    state.setOnline(a.id, true);
    assert.equal(state.onlineCount(), 1);
    assert.deepEqual(state.localOnline(), [a.id]);
    assert.equal(state.remoteHome(a.id), undefined, 'it streams here');
    assert.deepEqual(told, [[a.id, true]]);

    events.length = 0;
    state.setObservedEndpoint(b.id, '198.51.100.9:41641');
    assert.deepEqual(state.endpointsOf(state.getNode(b.id)!), ['192.0.2.10:41641', '198.51.100.9:41641']);
    assert.deepEqual(
      events.map((e) => e.type),
      ['node-patched'],
    );
    now += 5_000;
    state.touch(b.id);
    assert.equal(state.getNode(b.id)!.lastSeen, now);
  });

  it('cuts a node off exactly when its key reaches the maximum age', async () => {
    const a = await join('p', 'a');
    assert.equal(state.isKeyExpired(a), false, 'no maximum key age');
    await state.setMaxKeyAge('test', 'p', MINUTE);
    assert.equal(state.isKeyExpired(a, a.keySetAt + MINUTE - 1), false);
    assert.equal(state.isKeyExpired(a, a.keySetAt + MINUTE), true);
  });

  it('reaps an ephemeral node a timeout after it was last seen, not after it joined', async () => {
    const e = await join('p', 'e', { ephemeral: true });
    await join('p', 'kept');
    now += 50_000;
    state.touch(e.id);
    now += 11_000;
    assert.deepEqual(await state.reapEphemeral(), [], 'seen 11 s ago');
    now += 50_000;
    assert.deepEqual(
      (await state.reapEphemeral()).map((n) => n.name),
      ['e'],
    );
    assert.deepEqual(
      state.listNodes('p').map((n) => n.name),
      ['kept'],
    );
  });

  it('refuses a policy whose tests fail unless forced', async () => {
    await join('p', 'a');
    const failing = `{"acls":[],"tests":[{"src":"a","accept":["a:22"]}]}`;
    await assert.rejects(state.setPolicy('test', 'p', failing), /test/);
    assert.equal(state.getPolicy('p'), undefined);
    await state.setPolicy('test', 'p', failing, true);
    assert.equal(state.getPolicy('p')?.source, failing);
  });

  it('applies a global policy to the projects without their own', async () => {
    const a = await join('p', 'a');
    const b = await join('p', 'b');
    await state.setPolicy('test', 'q', '{"acls":[]}');
    events.length = 0;
    const none = '{"acls":[]}';
    await state.setGlobalPolicy('test', none);
    assert.equal(state.getGlobalPolicy()?.source, none);
    assert.deepEqual(
      events.map((e) => (e.type === 'policy-changed' ? e.project : e.type)),
      ['p'],
      'q keeps its own',
    );
    assert.equal(state.compiled('p').canSee(a.id, b.id), false);
    await state.setGlobalPolicy('test', '');
    assert.equal(state.getGlobalPolicy(), undefined);
    assert.equal(state.compiled('p').canSee(a.id, b.id), true);
  });

  it('tells drift, the version an auth key will be told, and ignores reports of unknown nodes', async () => {
    const ops = await join('p', 'ops', { tags: ['tag:ops'] });
    await state.setPolicy('test', 'p', `{"tagOwners":{"tag:ops":[]},"acls":[]}`);
    assert.equal(state.isDrifting(ops), false, 'no desired version');
    await state.setDesiredVersion('test', 'p', 'tag:ops', '2.0.0');
    assert.equal(state.isDrifting(ops), true);
    assert.equal(
      (await state.desiredEntryForAuthKey(await keyOf('p', { tags: ['tag:ops'] })))?.version,
      '2.0.0',
    );
    assert.equal(await state.desiredEntryForAuthKey(await keyOf('p')), undefined);
    await assert.rejects(
      state.setDesiredVersion('test', 'nope', '', '1.0.0'),
      /project "nope" does not exist/,
    );
    assert.doesNotThrow(() => state.reportUpdate('no-such-node', '2.0.0', 'failed', 'disk full'));
  });
});
