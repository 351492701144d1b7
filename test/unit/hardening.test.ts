import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { sql } from 'kysely';
import pino from 'pino';
import { render } from '../../cli/output.js';
import { Metrics } from '../../coordinator/api/metrics.js';
import { AuthThrottle } from '../../coordinator/api/throttle.js';
import { compilePolicy, parsePolicy, runPolicyTests } from '../../coordinator/policy/index.js';
import { storedTime } from '../../coordinator/state/records.js';
import { State } from '../../coordinator/state/state.js';
import { openStore } from '../../coordinator/store/db.js';
import { parseDuration } from '../../proto/duration.js';
import { encodeWgKey, generateMachineKey, generateNodeKey } from '../../proto/keys.js';
import { quote, unsafeCharacter } from '../../proto/text.js';

describe('durations', () => {
  it('refuses what no timestamp can hold, with a short quote of the input', () => {
    assert.equal(parseDuration('3650d'), 3650 * 86_400_000);
    assert.throws(
      () => parseDuration('99999999999999999999d'),
      /invalid duration "99999999999999999999d": at most 3650d/,
    );
    assert.throws(() => parseDuration(`${'9'.repeat(400)}s`), /invalid duration "9{16}…": longer than 64/);
    assert.throws(() => parseDuration('3651d'), /at most 3650d/);
  });
  it('reads a stored time out of range as the latest time a timestamp holds', () => {
    assert.equal(storedTime(8.64e27), 253_402_300_799_999);
    assert.equal(storedTime('8.64e27'), 253_402_300_799_999);
    assert.equal(storedTime(-5), 0);
    assert.equal(storedTime(1_700_000_000_000), 1_700_000_000_000);
  });
});

describe('policy evaluation is bounded', () => {
  const chain = (levels: number) => {
    const groups: Record<string, string[]> = {};
    for (let i = 0; i < levels; i++)
      groups[`group:g${i}`] = i === levels - 1 ? ['web', 'db'] : Array(10).fill(`group:g${i + 1}`);
    return groups;
  };

  it('expands groups that name each other ten times over in linear time', () => {
    const started = Date.now();
    const p = parsePolicy(
      JSON.stringify({
        groups: chain(12),
        acls: [{ action: 'accept', src: ['group:g0'], dst: ['group:g0:22'] }],
        tests: [{ src: 'db', accept: ['web:22'] }],
      }),
    );
    assert.ok(Date.now() - started < 1000, `took ${Date.now() - started} ms`);
    assert.deepEqual(p.acls[0]!.src, [
      { kind: 'node', name: 'web' },
      { kind: 'node', name: 'db' },
    ]);
    const node = (name: string, i: number) => ({
      id: name,
      name,
      ips: [`100.64.0.${i}`],
      tags: [],
      owner: 'k',
    });
    assert.ok(runPolicyTests(p, [node('web', 1), node('db', 2)]).every((r) => r.passed));
  });

  it('refuses a policy that expands past the budget, at its place', () => {
    const members = Array.from({ length: 2000 }, (_, i) => `10.${i >> 8}.${i & 255}.0/24`);
    const acls = Array.from({ length: 600 }, () => ({ action: 'accept', src: ['group:big'], dst: ['*:22'] }));
    assert.throws(
      () => parsePolicy(JSON.stringify({ groups: { 'group:big': members }, acls }, null, 1)),
      /policy:\d+:\d+: acls\[\d+\]: the policy expands to more than 1000000 selectors/,
    );
  });

  it('compiles rules that share a large group once per prefix, not once per rule and node', () => {
    const members = Array.from({ length: 2000 }, (_, i) => `10.${i >> 8}.${i & 255}.0/24`);
    const acls = Array.from({ length: 240 }, (_, k) => ({
      action: 'accept',
      src: ['group:big'],
      dst: [`group:big:${k + 1}`, `n${k}:22`],
    }));
    const p = parsePolicy(JSON.stringify({ groups: { 'group:big': members }, acls }));
    const nodes = Array.from({ length: 1000 }, (_, i) => ({
      id: `n${i}`,
      name: `n${i}`,
      ips: [`100.64.${i >> 8}.${i & 255}`],
      tags: [],
      owner: 'k',
    }));
    const started = Date.now();
    const c = compilePolicy(p, nodes);
    assert.deepEqual(c.visiblePeers('n1'), []);
    assert.ok(Date.now() - started < 30_000, `took ${Date.now() - started} ms`);
  });

  it('refuses tests that would look at too many rule selectors, at the test', () => {
    const members = Array.from({ length: 2000 }, (_, i) => `10.${i >> 8}.${i & 255}.0/24`);
    const acls = Array.from({ length: 200 }, () => ({ action: 'accept', src: ['group:big'], dst: ['*:22'] }));
    const tests = Array.from({ length: 10 }, () => ({ src: '10.200.0.1', deny: ['10.201.0.1:22'] }));
    assert.throws(
      () => parsePolicy(JSON.stringify({ groups: { 'group:big': members }, acls, tests })),
      /tests\[4\]: the tests would look at more than 2000000 rule selectors/,
    );
  });

  it('quotes a short prefix of a long name in its messages', () => {
    const name = `group:${'a'.repeat(100_000)}`;
    assert.throws(
      () => parsePolicy(JSON.stringify({ groups: { [name]: [] }, unknown: 1 })),
      (err: Error) => err.message.length < 300 && /unknown key "unknown"/.test(err.message),
    );
    assert.throws(
      () => parsePolicy(JSON.stringify({ groups: { [name]: ['web'] } })),
      (err: Error) => err.message.length < 300 && /groups\["group:a{58}…"\]/.test(err.message),
    );
  });

  it('refuses deep nesting with line and column instead of overflowing the stack', () => {
    const deep = `{\n  "acls": ${'['.repeat(10_000)}${']'.repeat(10_000)}\n}`;
    assert.throws(() => parsePolicy(deep), /policy:2:42: syntax error: nested more than 32 levels deep$/);
    assert.throws(
      () => parsePolicy(`{"hosts": ${'{"a":'.repeat(5000)}1${'}'.repeat(5000)}}`),
      /nested more than 32 levels deep/,
    );
  });
});

describe('text on terminals', () => {
  const columns = [{ header: 'NAME', value: (r: { v: string }) => r.v }];
  const rows = [{ v: 'a\u009b31mb\u202ec\u0085d\u001be' }];

  it('escapes control and bidi characters in tables, JSON and YAML', () => {
    assert.equal(render('table', null, rows, columns), 'NAME\na\\u009b31mb\\u202ec\\u0085d\\u001be');
    for (const format of ['json', 'yaml'] as const) {
      const out = render(format, rows, rows, columns);
      assert.equal(unsafeCharacter(out.replaceAll('\n', '')), undefined, format);
      assert.match(out, /\\u009b/, format);
    }
    assert.deepEqual(JSON.parse(render('json', rows, rows, columns)), rows, 'JSON still means the same');
  });

  it('quotes a short, escaped prefix of values in messages', () => {
    assert.equal(quote('x'.repeat(100)), `"${'x'.repeat(64)}…"`);
    assert.equal(quote('a\u202eb'), '"a\\u202eb"');
  });
});

describe('node keys are unique in the store', () => {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-keys-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('the migration expires every holder of a key that older versions let two nodes share', async () => {
    const url = join(dir, 'old.db');
    let store = await openStore({ url });
    // Back to the schema before the migration, with what it let in.
    await sql`drop index nodes_node_key`.execute(store.db);
    await sql`alter table nodes drop column key_set_at`.execute(store.db);
    await sql`alter table projects drop column max_key_age_ms`.execute(store.db);
    await sql`alter table desired_versions drop column max_unavailable`.execute(store.db);
    for (const table of ['changes', 'replicas', 'presence', 'leases', 'replica_secret'])
      await sql`drop table ${sql.table(table)}`.execute(store.db);
    await sql`delete from id_counters where name = 'addresses'`.execute(store.db);
    await sql`delete from kysely_migration where name in ('0008_unique_node_keys', '0009_node_key_set_at', '0010_rollout_max_unavailable', '0011_replication')`.execute(
      store.db,
    );
    await store.db.insertInto('projects').values({ name: 'p', created_at: 1 }).execute();
    const node = (id: string, key: string, i: number) => ({
      id,
      project: 'p',
      name: id,
      machine_key: `m${id}`,
      node_key: key,
      ipv4: `100.64.0.${i}`,
      ipv6: `fd7a:115c:a1e0::${i}`,
      ip_index: i,
      tags: '[]',
      ephemeral: 0,
      auth_key_id: 'k',
      hostname: id,
      os: 'linux',
      version: '1',
      endpoints: '[]',
      advertised_routes: '[]',
      approved_routes: '[]',
      created_at: i,
      last_seen: null,
      expires_at: null,
      lockdown_ports: '[]',
    });
    await store.db
      .insertInto('nodes')
      .values([node('a', 'SAME', 1), node('b', 'SAME', 2), node('c', 'OWN', 3)])
      .execute();
    await store.close();

    store = await openStore({ url });
    try {
      const state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
      assert.ok(state.isExpired(state.getNode('a')!) && state.isExpired(state.getNode('b')!));
      assert.notEqual(state.getNode('a')!.nodeKey, state.getNode('b')!.nodeKey);
      assert.equal(state.getNode('c')!.nodeKey, 'OWN');
      assert.ok(!state.isExpired(state.getNode('c')!));
      const audit = await store.db
        .selectFrom('audit_log')
        .selectAll()
        .where('actor', '=', 'migration')
        .execute();
      assert.deepEqual(audit.map((r) => r.target).sort(), ['a', 'b']);
      await assert.rejects(
        store.db
          .insertInto('nodes')
          .values(node('d', 'OWN', 4))
          .execute(),
        /UNIQUE constraint failed: nodes.node_key/,
      );
    } finally {
      await store.close();
    }
  });

  it('loads a stored policy that an older version accepted with a bidi character, and refuses it as input', async () => {
    const store = await openStore({ url: join(dir, 'policy.db') });
    try {
      const source =
        '{\n  // \u202e reversed\n  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]\n}';
      await store.db.insertInto('projects').values({ name: 'p', created_at: 1 }).execute();
      await store.db.insertInto('policies').values({ project: 'p', source, updated_at: 1 }).execute();
      const state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
      assert.equal(state.getPolicy('p')?.source, source);
      await assert.rejects(
        state.setPolicy('test', 'p', source),
        /policy:2:6: syntax error: control or bidirectional/,
      );
      await state.close();
    } finally {
      await store.close();
    }
  });

  it('frees the key of a node deleted while it rotated to it', async () => {
    const store = await openStore({ url: join(dir, 'rotate.db') });
    const state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    try {
      await state.createProject('test', 'p');
      const register = async (nodeKey: string) => {
        const { key } = await state.keys.createAuthKey('test', {
          project: 'p',
          reusable: false,
          ephemeral: false,
          expiresInMs: 60_000,
          tags: [],
          reason: '',
        });
        return state.register({
          authKey: key,
          machineKey: Buffer.from(generateMachineKey().publicKey).toString('hex'),
          nodeKey,
          hostname: 'h',
          os: 'linux',
          version: '1',
          requestedTags: [],
          endpoints: [],
          advertisedRoutes: [],
        });
      };
      const { node } = await register(encodeWgKey(generateNodeKey().publicKey));
      const next = encodeWgKey(generateNodeKey().publicKey);
      const rotated = state.rotateNodeKey(node.id, next);
      await state.deleteNode('test', node.id);
      await rotated;
      const again = await register(next);
      assert.equal(again.node.nodeKey, next);
      await assert.rejects(register(next), /node key is already used by another node/);
    } finally {
      await state.close();
      await store.close();
    }
  });
});

describe('failed authentication throttle', () => {
  it('holds an address after its burst of failures until the budget refills, and no other', () => {
    let now = 0;
    const metrics = new Metrics({
      nodesOnline: () => 0,
      nodesTotal: () => 0,
      streams: () => 0,
      unsentBytes: () => ({ full: 0, deltas: 0 }),
      versionDrift: () => 0,
      apiKeyExpiries: async () => [],
    });
    const throttle = new AuthThrottle(
      { burst: 3, perSecond: 0.5 },
      pino({ level: 'silent' }),
      metrics,
      () => now,
    );
    for (let i = 0; i < 3; i++) {
      throttle.check('admin', '192.0.2.1', 'ListNodes');
      throttle.failed('admin', '192.0.2.1', 'ListNodes', 'unknown API key');
    }
    assert.throws(() => throttle.check('rest', '192.0.2.1', '/projects'), /too many failed authentications/);
    throttle.check('admin', '192.0.2.2', 'ListNodes');
    now += 1999;
    assert.throws(() => throttle.check('admin', '192.0.2.1', 'ListNodes'), /too many failed/);
    now += 1;
    throttle.check('admin', '192.0.2.1', 'ListNodes');
  });
});
