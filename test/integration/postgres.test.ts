// The same store on PostgreSQL: a throwaway cluster on a unix socket, the
// coordinator on top, registrations, a restart that reloads the state.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
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
});
