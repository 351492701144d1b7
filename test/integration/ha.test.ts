// Several coordinators on one PostgreSQL database (docs/ha.md): a throwaway
// cluster, three coordinators in this process, simulated agents spread over
// them.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';
import { type PostgresCluster, postgresSkip, startPostgres } from './postgres.js';

const skip = postgresSkip('high-availability test');

async function until(pred: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('several coordinators on one PostgreSQL database', { skip }, () => {
  let pg: PostgresCluster;
  let url: string;
  const replicas: TestCoordinator[] = [];
  const agents: SimAgent[] = [];

  before(async () => {
    pg = startPostgres();
    url = pg.createDatabase('meshgate');
    for (let i = 0; i < 3; i++)
      replicas.push(await startTestCoordinator({ database: url, ephemeralTimeout: '1s' }));
  });
  after(async () => {
    for (const a of agents) a.close();
    for (const r of replicas) await r.close();
    pg?.stop();
  });

  const agentOn = (r: TestCoordinator, machine?: SimAgent['machine']) => {
    const a = new SimAgent(r.url, r.fingerprint, machine);
    agents.push(a);
    return a;
  };

  it('gives 200 machines registering on three coordinators at once distinct addresses, one node each', async () => {
    const [a, b, c] = replicas as [TestCoordinator, TestCoordinator, TestCoordinator];
    const key = await authKey(a, 'reg', { reusable: true });
    await until(
      () => replicas.every((r) => r.c.state.getProject('reg') !== undefined),
      5000,
      'the project everywhere',
    );
    const machines = Array.from({ length: 200 }, (_, i) => agentOn(replicas[i % 3]!));
    // A tenth of the machines register a second time at once, on another coordinator.
    const again = machines.slice(0, 20).map((m, i) => agentOn(replicas[(i + 1) % 3]!, m.machine));
    const results = await Promise.all([
      ...machines.map((m, i) => m.register(key, `m-${i}`)),
      ...again.map((m, i) => m.register(key, `m-${i}`)),
    ]);
    const ids = new Set(results.map((r) => r.node!.id));
    assert.equal(ids.size, 200, 'one node per machine');
    for (const r of replicas) {
      await until(() => r.c.state.listNodes('reg').length === 200, 10_000, 'every node on every coordinator');
      const nodes = r.c.state.listNodes('reg');
      assert.equal(new Set(nodes.map((n) => n.ipv4)).size, 200, 'distinct IPv4 addresses');
      assert.equal(new Set(nodes.map((n) => n.ipv6)).size, 200, 'distinct IPv6 addresses');
      assert.equal(new Set(nodes.map((n) => n.numericId)).size, 200, 'distinct node numbers');
      assert.deepEqual(new Set(nodes.map((n) => n.id)), ids);
    }
    for (const r of [b, c])
      assert.equal((await r.admin.call('listNodes', { project: 'reg' })).nodes.length, 200);
  });

  it('brings a change made on one coordinator to an agent streaming to another', async () => {
    const [a, b, c] = replicas as [TestCoordinator, TestCoordinator, TestCoordinator];
    const key = await authKey(a, 'prop', { reusable: true });
    await until(
      () => replicas.every((r) => r.c.state.getProject('prop') !== undefined),
      5000,
      'the project everywhere',
    );
    const x = agentOn(b);
    await x.register(key, 'x');
    await x.connect();
    const y = agentOn(c);
    await y.register(key, 'y');
    await y.connect();
    await x.waitFor(() => x.peerIds().includes(y.id), 5000, 'y in the netmap of x');
    await until(() => a.c.state.isOnline(x.id) && a.c.state.isOnline(y.id), 5000, 'both online on a');

    const started = Date.now();
    await a.admin.call('renameNode', { id: y.id, project: 'prop', name: 'renamed' });
    await x.waitFor(
      () => x.netmap?.peers.find((p) => p.id === y.id)?.name === 'renamed',
      5000,
      'the rename on b',
    );
    const latency = Date.now() - started;
    assert.ok(latency < 2000, `a rename on a reached an agent on b after ${latency} ms`);

    await a.admin.call('deleteNode', { id: y.id, project: 'prop' });
    await x.waitFor(() => !x.peerIds().includes(y.id), 5000, 'y gone from the netmap of x');

    x.disconnect();
    await until(() => !a.c.state.isOnline(x.id) && !c.c.state.isOnline(x.id), 5000, 'x offline everywhere');
  });

  it('runs the periodic jobs on one coordinator only: an ephemeral node is reaped once', async () => {
    const [a, , c] = replicas as [TestCoordinator, TestCoordinator, TestCoordinator];
    const key = await authKey(a, 'eph', { ephemeral: true });
    await until(
      () => replicas.every((r) => r.c.state.getProject('eph') !== undefined),
      5000,
      'the project everywhere',
    );
    const e = agentOn(c);
    await e.register(key, 'e');
    await e.connect();
    await until(() => a.c.state.isOnline(e.id), 5000, 'e online on a');
    e.disconnect();
    await until(
      () => replicas.every((r) => r.c.state.getNode(e.id) === undefined),
      15_000,
      'the ephemeral node reaped everywhere',
    );
    const audit = await a.admin.call('listAuditEntries', { project: 'eph' });
    const reaps = audit.entries.filter((x) => x.action === 'node.reap' && x.target === e.id);
    assert.equal(reaps.length, 1, 'reaped once');
  });
});
