// Two coordinators on one PostgreSQL database, fw and m1 streaming to
// different ones. The coordinator fw streams to is killed with SIGKILL: a
// ping over the mesh from m1 to fw keeps being answered, and fw shows itself
// connected again, to the other coordinator.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe } from 'node:test';
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import { ensureTlsIdentity } from '../../coordinator/tls.js';
import { type PostgresCluster, postgresSkip, startPostgres } from '../integration/postgres.js';
import { TOOLS } from './harness/datacenter.js';
import { BIN, buildOnce, labSteps, MeshLab, stopProcess, until } from './harness/mesh.js';
import { Topology, waitForOutput } from './harness/netns.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';

const skip = suiteSkip(TOOLS) || postgresSkip('high-availability e2e test');

describe('two coordinators on one database', { skip }, () => {
  let lab: MeshLab;
  let addr: Record<string, string>;
  let cluster: PostgresCluster;
  let url: string;
  const tlsDir = mkdtempSync(join(tmpdir(), 'meshgate-e2e-tls-'));
  const coordinators = new Map<string, ChildProcess>();

  const shared = (host: string) => [
    '--database',
    url,
    '--tls-key-file',
    join(tlsDir, 'tls.key'),
    '--tls-cert-file',
    join(tlsDir, 'tls.crt'),
    '--replica-address',
    `grpcs://${addr[host]}:7443`,
  ];

  /**
   * Which coordinator host node `name` streams to, from the shared presence
   * rows: the newest one (a killed coordinator's row stays until its lease ran out).
   */
  const homeOf = async (name: string): Promise<string | undefined> => {
    const db = new Kysely<{
      presence: { node_id: string; replica: string; since: number };
      replicas: { id: string; address: string };
      nodes: { id: string; name: string };
    }>({ dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: url, max: 1 }) }) });
    try {
      const rows = await db
        .selectFrom('presence')
        .innerJoin('replicas', 'replicas.id', 'presence.replica')
        .innerJoin('nodes', 'nodes.id', 'presence.node_id')
        .select('replicas.address')
        .where('nodes.name', '=', name)
        .orderBy('presence.since', 'desc')
        .limit(1)
        .execute();
      if (rows.length === 0) return undefined;
      return ['c1', 'c2'].find((h) => rows[0]!.address === `grpcs://${addr[h]}:7443`);
    } finally {
      await db.destroy();
    }
  };

  before(async () => {
    buildOnce();
    cluster = startPostgres();
    url = cluster.createDatabase('meshgate');
    await ensureTlsIdentity(tlsDir);
    lab = new MeshLab(new Topology());
    addr = await star(lab.topo, ['c1', 'c2', 'fw', 'm1']);
    // c1 is the lab's coordinator (its admin socket serves lab.admin); c2 runs beside it.
    await lab.startCoordinator('c1', addr.c1!, shared('c1'));
    coordinators.set('c1', lab.coordinator!.proc);
    const c2 = lab.topo.spawn('c2', process.execPath, [
      BIN,
      'coordinator',
      '--data-dir',
      join(lab.dir, 'data-c2'),
      '--grpc-listen',
      `${addr.c2}:7443`,
      '--http-listen',
      `${addr.c2}:7480`,
      '--log-level',
      'warn',
      ...shared('c2'),
    ]);
    coordinators.set('c2', c2);
    await waitForOutput(c2, /fingerprint\s+sha256:[0-9a-f]{64}/, 30_000);
  });
  after(async () => {
    printLogsIfFailed();
    for (const p of coordinators.values()) await stopProcess(p, 'SIGKILL');
    await lab?.destroy();
    cluster?.stop();
    rmSync(tlsDir, { recursive: true, force: true });
  });
  const { step, printLogsIfFailed } = labSteps(() => lab);

  step('fw moves to the other coordinator when its own is killed; ping over the mesh goes on', async (t) => {
    const key = lab.authKey('ha', { reusable: true });
    const both = `grpcs://${addr.c1}:7443,grpcs://${addr.c2}:7443`;
    lab.startAgent('fw', 'fw', { keyFile: key, extra: ['--coordinator', both] });
    const fwHome = await until('fw on a coordinator', () => homeOf('fw'), 30_000);
    const other = fwHome === 'c1' ? 'c2' : 'c1';
    lab.startAgent('m1', 'm1', { keyFile: key, extra: ['--coordinator', `grpcs://${addr[other]}:7443`] });
    await lab.waitForPeer('m1', 'fw', true, 30_000);
    await lab.waitForPeer('fw', 'm1', true, 30_000);
    assert.equal(await until('m1 on a coordinator', () => homeOf('m1'), 30_000), other);
    const ipFw = await lab.meshIp('fw');
    await lab.topo.exec('m1', 'ping', ['-c', '1', '-W', '2', ipFw]);

    // 60 pings 0.2 s apart; the coordinator dies after the first second.
    const pinging = lab.topo.exec('m1', 'ping', ['-c', '60', '-i', '0.2', '-W', '1', ipFw], {
      timeoutMs: 30_000,
    });
    await new Promise((r) => setTimeout(r, 1000));
    await stopProcess(coordinators.get(fwHome)!, 'SIGKILL');
    const killed = Date.now();
    await until(
      'fw connected to the other coordinator',
      async () =>
        (await lab.status('fw')).coordinator.state === 'connected' && (await homeOf('fw')) === other,
      20_000,
      200,
    );
    const moved = Date.now() - killed;
    const out = await pinging;
    const received = Number(/(\d+) received/.exec(out)?.[1] ?? 0);
    t.diagnostic(
      `fw connected to ${other} ${moved} ms after ${fwHome} was killed; ${received} of 60 pings answered`,
    );
    assert.ok(received >= 59, `ping over the mesh: ${received} of 60 answered while fw changed coordinators`);
    assert.equal((await lab.status('m1')).coordinator.state, 'connected');
  });
});
