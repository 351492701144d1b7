// The same store on PostgreSQL: a throwaway cluster on a unix socket, the
// coordinator on top, registrations, a restart that reloads the state.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Kysely, PostgresDialect, sql } from 'kysely';
import Pg from 'pg';
import { openStore } from '../../coordinator/store/db.js';
import { migrate } from '../../coordinator/store/migrations.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';
import { type PostgresCluster, postgresSkip, startPostgres } from './postgres.js';

const skip = postgresSkip('PostgreSQL test');

describe('coordinator on PostgreSQL', { skip }, () => {
  let pg: PostgresCluster;
  let url: string;
  let t: TestCoordinator | null = null;

  before(() => {
    pg = startPostgres();
    url = pg.createDatabase('meshgate');
  });
  after(async () => {
    await t?.close();
    pg?.stop();
  });

  it('migrates, registers concurrently with distinct addresses, and reloads after a restart', async () => {
    t = await startTestCoordinator({ database: url });
    const key = await authKey(t, 'pg', { reusable: true });
    const agents = Array.from({ length: 20 }, () => new SimAgent(t!.url, t!.fingerprint));
    const regs = await Promise.all(agents.map((a, i) => a.register(key, `n-${i}`)));
    for (const a of agents) a.close();
    assert.equal(new Set(regs.map((r) => r.node!.ipAddresses[0])).size, 20);
    await t.admin.call('setPolicy', {
      project: 'pg',
      policy: '{"acls":[{"action":"accept","src":["*"],"dst":["*:22"]}]}',
    });
    const dataDir = t.dataDir;
    await t.c.close();
    t.admin.close();
    t = await startTestCoordinator({ database: url, dataDir });
    const nodes = (await t.admin.call('listNodes', { project: 'pg' })).nodes;
    assert.equal(nodes.length, 20);
    assert.match((await t.admin.call('getPolicy', { project: 'pg' })).policy, /dst/);
    const again = new SimAgent(t.url, t.fingerprint, agents[0]!.machine);
    const r = await again.register('', 'n-0');
    again.close();
    assert.equal(r.existing, true);
    assert.deepEqual(r.node!.ipAddresses, regs[0]!.node!.ipAddresses);
  });

  it('numbers the projects and nodes of an older database on upgrade', async () => {
    const upgradeUrl = pg.createDatabase('upgrade');
    const old = new Kysely<unknown>({
      dialect: new PostgresDialect({ pool: new Pg.Pool({ connectionString: upgradeUrl }) }),
    });
    try {
      await migrate(old, 'postgres', '0001_initial');
      await sql`insert into projects (name, created_at) values ('second', 2), ('first', 1)`.execute(old);
      await sql`insert into nodes (id, project, name, machine_key, node_key, ipv4, ipv6, ip_index, tags,
        ephemeral, auth_key_id, hostname, os, version, endpoints, advertised_routes, approved_routes, created_at)
        values ('n0', 'first', 'old', 'mk', 'nk', '100.64.0.9', 'fd7a:115c:a1e0::9', 9, '[]',
        0, 'k', 'old', 'linux', '1', '[]', '[]', '[]', 1)`.execute(old);
    } finally {
      await old.destroy();
    }
    const store = await openStore({ url: upgradeUrl });
    try {
      const projects = await store.db
        .selectFrom('projects')
        .select(['name', 'numeric_id'])
        .orderBy('name')
        .execute();
      assert.deepEqual(projects, [
        { name: 'first', numeric_id: 1 },
        { name: 'second', numeric_id: 2 },
      ]);
      const node = await store.db.selectFrom('nodes').select('numeric_id').executeTakeFirstOrThrow();
      assert.equal(node.numeric_id, 1);
      const counters = await store.db.selectFrom('id_counters').selectAll().orderBy('name').execute();
      assert.deepEqual(counters, [
        // Where coordinators sharing the database continue handing out addresses.
        { name: 'addresses', last: 9 },
        { name: 'nodes', last: 1 },
        { name: 'projects', last: 2 },
      ]);
    } finally {
      await store.close();
    }
  });
});
