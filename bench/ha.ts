// Several coordinators on one PostgreSQL database (docs/ha.md): how fast a
// change made on one reaches agents streaming to the others, what each
// coordinator costs, and how long agents of a coordinator killed with
// SIGKILL take to be back on another; and, first, the same agents and
// trials against one coordinator on its own database, for comparison.
//
//   node --import tsx bench/ha.ts [--agents 1000] [--projects 1] [--replicas 3] [--trials 10] [--movers 50] [--json]
//
// Needs root and PostgreSQL's server binaries (a throwaway cluster, as the
// integration tests use). Each coordinator is `bin/meshgate coordinator` in a
// child process; the simulated agents run here, spread evenly over them.
import { mkdtempSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { ControlClient } from '../agent/control/client.js';
import { ControlSession } from '../agent/control/session.js';
import { ensureTlsIdentity } from '../coordinator/tls.js';
import { generateMachineKey, generateNodeKey } from '../proto/keys.js';
import { startPostgres } from '../test/integration/postgres.js';
import { AgentFleet, type BenchAgent, pool } from './lib/agents.js';
import { CoordinatorProcess } from './lib/coordinator-process.js';
import { log, machineInfo } from './lib/report.js';
import { nowMs, round, sleep, summarize } from './lib/stats.js';

const { values } = parseArgs({
  options: {
    agents: { type: 'string', default: '1000' },
    replicas: { type: 'string', default: '3' },
    trials: { type: 'string', default: '10' },
    movers: { type: 'string', default: '50' },
    /** The agents in this many projects of equal size; propagation is measured in the first. */
    projects: { type: 'string', default: '1' },
    json: { type: 'boolean', default: false },
  },
});
const n = Number(values.agents);
const r = Number(values.replicas);
const trials = Number(values.trials);
const movers = Number(values.movers);
const projects = Number(values.projects);
if (!(n >= r && r >= 2 && trials >= 1 && movers >= 1 && projects >= 1 && n >= projects * 2))
  throw new Error('need --agents ≥ --replicas ≥ 2 and at least two agents per project');
const MiB = 2 ** 20;
/** Propagation is measured in the first project. */
const PROJECT = 'p0';
const projectNames = Array.from({ length: projects }, (_, p) => `p${p}`);
/** Agent i's project: consecutive agents share one, so each project spans every coordinator. */
const projectOf = (i: number) => Math.floor((i * projects) / n);
const projectSize = (p: number) => Math.floor(((p + 1) * n) / projects) - Math.floor((p * n) / projects);

/** One reusable auth key per project. */
async function createProjects(admin: Awaited<ReturnType<CoordinatorProcess['admin']>>): Promise<string[]> {
  const keys: string[] = [];
  for (const name of projectNames) {
    await admin.call('createProject', { name });
    keys.push(
      (await admin.call('createAuthKey', { project: name, reusable: true, expiration: '24h' })).authKey!.key,
    );
  }
  return keys;
}

async function until(pred: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = nowMs() + timeoutMs;
  while (!(await pred())) {
    if (nowMs() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Connections the coordinators hold to database `name` now. */
async function connections(url: string, name: string): Promise<number> {
  const db = new Kysely<unknown>({
    dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: url, max: 1 }) }),
  });
  try {
    const r = await sql<{
      n: number;
    }>`select count(*)::int as n from pg_stat_activity where datname = ${name}`.execute(db);
    return r.rows[0]!.n - 1;
  } finally {
    await db.destroy();
  }
}

/**
 * The same agents and trials against one coordinator on its own database, in
 * the same run: what the replicas' figures compare with.
 */
async function baseline(url: string, config: Record<string, unknown>): Promise<Record<string, unknown>> {
  const c = await CoordinatorProcess.start({ config: { ...config, database: url } });
  const fleet = await AgentFleet.open(c.url, c.fingerprint, 50, 'node');
  const extra = await AgentFleet.open(c.url, c.fingerprint, 50, 'node');
  try {
    const admin = await c.admin();
    const keys = await createProjects(admin);
    const key = keys[0]!;
    const agents = Array.from({ length: n }, () => fleet.agent());
    log(`baseline: one coordinator, ${n} agents`);
    const t0 = nowMs();
    await pool(agents, 50, (a, i) => a.register(keys[projectOf(i)]!, `agent-${i}`).then(() => undefined));
    await pool(agents, 100, (a) => a.connect());
    await until(
      () => agents.every((a, i) => a.peers.size === projectSize(projectOf(i)) - 1),
      Math.max(60_000, n * 60),
      'full meshes',
    );
    const mesh = agents.filter((_, i) => projectOf(i) === 0);
    const connectMs = round(nowMs() - t0);
    await sleep(2000);
    const add: number[] = [];
    const cpu0 = c.cpuSeconds();
    const tp0 = nowMs();
    for (let t = 0; t < trials; t++) {
      let id = '';
      const w = fleet.watch(mesh, (a) => id !== '' && a.hasPeer(id));
      const res = await extra.agent().register(key, `prop-${t}`);
      const start = nowMs();
      id = res.node!.id;
      for (const a of mesh) w.check(a);
      await w.wait(60_000, `node prop-${t}`);
      add.push(...w.latencies(start));
      const gone = fleet.watch(mesh, (a) => !a.hasPeer(id));
      await admin.call('deleteNode', { id, project: PROJECT });
      await gone.wait(60_000, `removal of prop-${t}`);
      await sleep(200);
    }
    return {
      allPeersKnownMs: connectMs,
      addMs: summarize(add),
      coordinatorCpuPct: round(((c.cpuSeconds() - cpu0) / ((nowMs() - tp0) / 1000)) * 100),
      rssMiB: round(c.rssBytes() / MiB),
      databaseConnections: await connections(url, 'baseline'),
    };
  } finally {
    fleet.close();
    extra.close();
    await c.close();
  }
}

const cluster = startPostgres();
const tlsDir = mkdtempSync(join(tmpdir(), 'meshgate-bench-tls-'));
const coordinators: CoordinatorProcess[] = [];
const fleets: AgentFleet[] = [];
const sessions: ControlSession[] = [];
const result: Record<string, unknown> = {
  command: `bench/ha.ts --agents ${n} --projects ${projects} --replicas ${r} --trials ${trials} --movers ${movers}`,
  machine: machineInfo(),
  loadAverageAtStart: loadavg()[0],
};
try {
  await ensureTlsIdentity(tlsDir);
  const tls = { tlsKeyFile: join(tlsDir, 'tls.key'), tlsCertFile: join(tlsDir, 'tls.crt') };
  result.oneCoordinator = await baseline(cluster.createDatabase('baseline'), tls);
  const url = cluster.createDatabase('meshgate');
  const config = { database: url, ...tls };
  for (let i = 0; i < r; i++) coordinators.push(await CoordinatorProcess.start({ config }));
  const fp = coordinators[0]!.fingerprint;
  if (coordinators.some((c) => c.fingerprint !== fp)) throw new Error('coordinators differ in fingerprint');
  log(`${r} coordinators on one database: ${coordinators.map((c) => c.url).join(' ')}`);
  const admin = await coordinators[0]!.admin();
  const keys = await createProjects(admin);
  const key = keys[0]!;
  for (const c of coordinators) {
    const a = await c.admin();
    await until(
      async () => (await a.call('listProjects', {})).projects.length === projects,
      10_000,
      'the project on every coordinator',
    );
  }
  for (const c of coordinators) fleets.push(await AgentFleet.open(c.url, fp, 50, 'node'));
  const others = await AgentFleet.open(coordinators[0]!.url, fp, 50, 'node');
  fleets.push(others);
  const all: { a: BenchAgent; replica: number; project: number }[] = Array.from({ length: n }, (_, i) => ({
    a: fleets[i % r]!.agent(),
    replica: i % r,
    project: projectOf(i),
  }));
  const agents = all.filter((x) => x.project === 0);
  log(`registering and connecting ${n} agents, ${Math.ceil(n / r)} per coordinator`);
  const t0 = nowMs();
  await pool(all, 50, ({ a, project }, i) => a.register(keys[project]!, `agent-${i}`).then(() => undefined));
  await pool(all, 100, ({ a }) => a.connect());
  await until(
    () => all.every(({ a, project }) => a.peers.size === projectSize(project) - 1),
    Math.max(60_000, n * 60),
    'full meshes',
  );
  result.connect = { agents: n, projects, replicas: r, allPeersKnownMs: round(nowMs() - t0) };
  await sleep(2000);

  // A node added on coordinator 0 and deleted there again; every agent's
  // latency is counted, those on other coordinators apart.
  const addLocal: number[] = [];
  const addCross: number[] = [];
  const delCross: number[] = [];
  const addCrossAll: number[] = [];
  const cpu0 = coordinators.map((c) => c.cpuSeconds());
  const tp0 = nowMs();
  for (let t = 0; t < trials; t++) {
    const name = `prop-${t}`;
    const byReplica = (replica: number, test: (a: BenchAgent) => boolean) =>
      fleets[replica]!.watch(
        agents.filter((x) => x.replica === replica).map((x) => x.a),
        test,
      );
    let id = '';
    const seen = (a: BenchAgent) => id !== '' && a.hasPeer(id);
    const watches = coordinators.map((_, i) => byReplica(i, seen));
    const res = await others.agent().register(key, name);
    const start = nowMs();
    id = res.node!.id;
    for (const w of watches) for (const x of agents) w.check(x.a);
    await Promise.all(watches.map((w) => w.wait(60_000, `node ${name}`)));
    addLocal.push(...watches[0]!.latencies(start));
    const cross = watches.slice(1).flatMap((w) => w.latencies(start));
    addCross.push(...cross);
    addCrossAll.push(Math.max(...cross));
    const gone = coordinators.slice(1).map((_, i) => byReplica(i + 1, (a) => !a.hasPeer(id)));
    await admin.call('deleteNode', { id, project: PROJECT });
    const start2 = nowMs();
    await Promise.all(gone.map((w) => w.wait(60_000, `removal of ${name}`)));
    delCross.push(...gone.flatMap((w) => w.latencies(start2)));
    await sleep(200);
  }
  const wall = (nowMs() - tp0) / 1000;
  result.propagation = {
    trials,
    note: 'node registered on coordinator 0; latency from the registration reply to each agent applying it',
    addSameCoordinatorMs: summarize(addLocal),
    addOtherCoordinatorsMs: summarize(addCross),
    addOtherCoordinatorsAllAgentsMs: summarize(addCrossAll),
    deleteOtherCoordinatorsMs: summarize(delCross),
    coordinatorCpuPct: coordinators.map((c, i) => round(((c.cpuSeconds() - cpu0[i]!) / wall) * 100)),
  };

  result.cost = {
    note: 'connected, after the propagation trials; compare oneCoordinator',
    rssMiB: coordinators.map((c) => round(c.rssBytes() / MiB)),
    databaseConnections: await connections(url, 'meshgate'),
  };

  // Agents with every coordinator's address (the agent's own session code)
  // on the last coordinator, which is then killed.
  const victim = coordinators[r - 1]!;
  const list = coordinators.map((c) => c.url).join(',');
  const state = new Map<ControlSession, string>();
  for (let i = 0; i < movers; i++) {
    const machine = generateMachineKey();
    const client = new ControlClient({ url: list, fingerprint: fp, machineSecretKey: machine.secretKey });
    while (!client.display.endsWith(`:${victim.grpcPort}`)) client.failover();
    const s = new ControlSession(
      client,
      {
        authKey: () => key,
        nodePublic: generateNodeKey().publicKey,
        machinePublic: machine.publicKey,
        hostname: `mover-${i}`,
        os: 'linux',
        version: '0.1.0',
        requestedTags: [],
        advertisedRoutes: [],
        endpoints: () => ['192.0.2.30:41641'],
        lockdownPorts: [],
      },
      false,
    );
    s.on('state', (st) => state.set(s, st));
    sessions.push(s);
  }
  await Promise.all(sessions.map((s) => s.start()));
  await until(() => sessions.every((s) => state.get(s) === 'connected'), 60_000, 'movers connected');
  log(`killing coordinator ${r - 1} (pid ${victim.pid}) with SIGKILL, ${movers} agents on it`);
  const back = new Map<ControlSession, number>();
  for (const s of sessions) {
    s.on('state', (st) => {
      if (st === 'connected' && !back.has(s)) back.set(s, nowMs());
    });
  }
  const killedAt = nowMs();
  victim.proc!.kill('SIGKILL');
  await until(() => back.size === sessions.length, 60_000, 'every moved agent connected elsewhere');
  const moved = [...back.values()].map((t) => t - killedAt);
  result.failover = {
    agents: movers,
    note: 'from SIGKILL to each agent connected to another coordinator (its session reconnects with backoff 0.25-0.5 s first)',
    backOnAnotherMs: summarize(moved),
  };
  result.loadAverageAtEnd = loadavg()[0];
} finally {
  for (const s of sessions) s.stop();
  for (const f of fleets) f.close();
  for (const c of coordinators) await c.close().catch(() => {});
  cluster.stop();
  rmSync(tlsDir, { recursive: true, force: true });
}
if (values.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
else log(JSON.stringify(result, null, 2));
