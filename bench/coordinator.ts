// The coordinator benchmarks at one size: registrations per second, delta
// propagation to every connected agent, a policy change, idle CPU and memory
// per connected agent, and a reconnect storm after a restart.
//
//   node --import tsx bench/coordinator.ts --agents 1000 [--projects 10] [--only propagation,idle] [--json]
//
// The coordinator runs as a child process (bin/meshgate coordinator); the
// simulated agents run here. Progress goes to stderr; with --json the result
// object is printed on stdout.
import { loadavg } from 'node:os';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { AgentFleet, type BenchAgent, pool, type Signer } from './lib/agents.js';
import { CoordinatorProcess } from './lib/coordinator-process.js';
import { log, machineInfo } from './lib/report.js';
import { CpuMeter, nowMs, round, type Summary, sleep, summarize } from './lib/stats.js';

export const BENCHMARKS = ['registration', 'propagation', 'policy', 'idle', 'storm'] as const;
export type Benchmark = (typeof BENCHMARKS)[number];

export interface SuiteOptions {
  agents: number;
  /** The agents are spread over this many projects; propagation and policy run in the first. */
  projects: number;
  only: Benchmark[];
  /** Agents per TLS connection: 1, as real agents have; more to share connections. */
  agentsPerConnection: number;
  /** Registrations in flight in the concurrent registration run. */
  concurrency: number;
  trials: number;
  policyTrials: number;
  stormTrials: number;
  idleSeconds: number;
  /** node: the agents' calls are signed with node:crypto (same bytes as the agent's tweetnacl). */
  signer: Signer;
  cpuProfDir?: string;
  /** Write a heap snapshot of the coordinator into this directory before and after the agents connect. */
  heapSnapshotDir?: string;
}

export function defaults(agents: number): SuiteOptions {
  const big = agents > 1000;
  return {
    agents,
    projects: 1,
    only: [...BENCHMARKS],
    agentsPerConnection: 1,
    concurrency: 50,
    trials: big ? 5 : 20,
    policyTrials: big ? 2 : 5,
    stormTrials: big ? 1 : 3,
    idleSeconds: 60,
    signer: 'node',
  };
}

const PROJECT = 'mesh';
const projectName = (p: number) => (p ? `${PROJECT}-${p}` : PROJECT);
const POLICY = JSON.stringify({
  tagOwners: { 'tag:a': [], 'tag:b': [] },
  acls: [{ action: 'accept', src: ['tag:a'], dst: ['tag:b:*'] }],
});
const MiB = 2 ** 20;
const HEAP = 'meshgate_nodejs_heap_size_used_bytes';
const HEAP_TOTAL = 'meshgate_nodejs_heap_size_total_bytes';
const EXTERNAL = 'meshgate_nodejs_external_memory_bytes';

/**
 * What the coordinator and this process (the load generator) spent while `fn`
 * ran: CPU as % of one core, and this process's event-loop delay, which shows
 * when the load generator itself was too busy to take messages in time.
 */
async function measured<T>(
  c: CoordinatorProcess,
  fn: () => Promise<T>,
): Promise<{
  value: T;
  wallMs: number;
  coordinatorCpuPct: number;
  loadCpuPct: number;
  loadLoopDelayP99Ms: number;
  /** The coordinator's resident memory before and at its highest, sampled every 100 ms. */
  rssBeforeMiB: number;
  rssPeakMiB: number;
}> {
  const cpu0 = c.cpuSeconds();
  const meter = new CpuMeter();
  const lag = monitorEventLoopDelay({ resolution: 10 });
  lag.enable();
  const rssBefore = c.rssBytes();
  let rssPeak = rssBefore;
  const sampler = setInterval(() => {
    try {
      rssPeak = Math.max(rssPeak, c.rssBytes());
    } catch {
      // The coordinator is restarting.
    }
  }, 100);
  const t0 = nowMs();
  const value = await fn().finally(() => clearInterval(sampler));
  const wallMs = nowMs() - t0;
  lag.disable();
  return {
    value,
    wallMs,
    rssBeforeMiB: round(rssBefore / MiB),
    rssPeakMiB: round(rssPeak / MiB),
    coordinatorCpuPct: round(((c.cpuSeconds() - cpu0) * 1e5) / wallMs),
    loadCpuPct: meter.lap(),
    loadLoopDelayP99Ms: round(lag.percentile(99) / 1e6),
  };
}

/** The CPU and event-loop fields of a measurement, for the result object. */
function costs(
  m: { coordinatorCpuPct: number; loadCpuPct: number; loadLoopDelayP99Ms: number },
  coordinator = true,
) {
  return {
    ...(coordinator ? { coordinatorCpuPct: m.coordinatorCpuPct } : {}),
    loadCpuPct: m.loadCpuPct,
    loadLoopDelayP99Ms: m.loadLoopDelayP99Ms,
  };
}

/** Waits until no agent has received a message for `quietMs`. */
async function quiet(fleet: AgentFleet, quietMs: number, timeoutMs: number): Promise<number> {
  const t0 = nowMs();
  let last = fleet.messages;
  let since = nowMs();
  while (nowMs() - since < quietMs) {
    if (nowMs() - t0 > timeoutMs) throw new Error(`agents still receiving messages after ${timeoutMs} ms`);
    await sleep(50);
    if (fleet.messages !== last) {
      last = fleet.messages;
      since = nowMs();
    }
  }
  return since - t0;
}

function perAgent(total: number, n: number): number {
  return round(total / n, 1);
}

/**
 * Runs the selected benchmarks and fills `result` as it goes, so that a run
 * stopped from outside still reports what it measured and where it was.
 */
export async function runSuite(
  o: SuiteOptions,
  result: Record<string, unknown> = {},
): Promise<Record<string, unknown>> {
  const n = o.agents;
  const want = (b: Benchmark) => o.only.includes(b);
  // Waits for the agents fail after this long without progress (Watch.wait),
  // waits for the traffic to end after this long (4× after connect and storm).
  const waitMs = Math.max(60_000, n * 30);
  Object.assign(result, { agents: n, options: { ...o }, loadAverageAtStart: loadavg()[0] });
  const phase = (name: string) => {
    result.phase = name;
    log(name);
  };
  const c = await CoordinatorProcess.start({ cpuProfDir: o.cpuProfDir, heapSnapshotDir: o.heapSnapshotDir });
  log(`coordinator pid ${c.pid} on ${c.url}`);
  const fleet = await AgentFleet.open(c.url, c.fingerprint, o.agentsPerConnection, o.signer);
  const others = await AgentFleet.open(c.url, c.fingerprint, o.agentsPerConnection, o.signer);
  // Every 15 s: how far the agents got, for long runs.
  const ticker = setInterval(() => {
    try {
      const full = fleet.agents.filter((a) => a.hasFull).length;
      log(
        `  … ${full}/${fleet.agents.length} agents with a netmap, ${fleet.messages} messages, ` +
          `coordinator RSS ${round(c.rssBytes() / MiB)} MiB`,
      );
    } catch {
      // The coordinator is restarting.
    }
  }, 15_000);
  try {
    const admin = await c.admin();
    const keyOf = async (project: string, tags: string[]) =>
      (await admin.call('createAuthKey', { project, reusable: true, tags, expiration: '24h' })).authKey!.key;
    // Memory per agent counts from here: each agent's node, its TLS
    // connection (opened by Register) and its stream.
    const snapshots: string[] = [];
    if (o.heapSnapshotDir) snapshots.push(await c.heapSnapshot());
    const rssBefore = c.rssBytes();
    const heapBefore = await c.metric(HEAP);
    const keys: string[] = [];
    for (let p = 0; p < o.projects; p++) {
      await admin.call('createProject', { name: projectName(p) });
      keys.push(await keyOf(projectName(p), ['tag:a', 'tag:b']));
    }

    // The N agents in projects of equal size (±1), in each half tag:a, half
    // tag:b; registered 50 at a time. `mesh` (the first project) is where
    // propagation and policy are measured.
    const groups = keys.map((_, p) => {
      const size = Math.floor((n * (p + 1)) / o.projects) - Math.floor((n * p) / o.projects);
      return Array.from({ length: size }, (_, j) => fleet.agent(j % 2 ? 'tag:b' : 'tag:a'));
    });
    const agents = groups.flat();
    const mesh = groups[0]!;
    const members = groups.flatMap((g, p) => g.map((a) => ({ a, key: keys[p]! })));
    const lat: number[] = [];
    const doneAt: number[] = [];
    // The first calls the coordinator serves since it started: nothing warmed
    // up its code, its statements or its connections before.
    phase(
      `registration, cold: ${n}${o.projects > 1 ? ` in ${o.projects} projects` : ''} with ${o.concurrency} concurrent`,
    );
    let regT0 = 0;
    const reg = await measured(c, () => {
      regT0 = nowMs();
      return pool(members, o.concurrency, async ({ a, key }, i) => {
        const t = nowMs();
        await a.register(key, `agent-${i}`);
        doneAt.push(nowMs());
        lat.push(nowMs() - t);
      });
    });
    const first = Math.min(n, 1000);
    result.registrationCold = {
      count: n,
      concurrency: o.concurrency,
      perSecond: round((n / reg.wallMs) * 1000),
      [`first${first}PerSecond`]: round((first / (doneAt[first - 1]! - regT0)) * 1000),
      latencyMs: summarize(lat),
      coordinatorCpuMsPerRegistration: round((reg.coordinatorCpuPct * reg.wallMs) / 100 / n, 2),
      ...costs(reg),
    };

    // Warm: after the connected agents, so that its nodes and connections do
    // not count in the memory per connected agent.
    const sequential = async () => {
      await admin.call('createProject', { name: 'seq' });
      const seqKey = await keyOf('seq', []);
      const seq = Array.from({ length: n }, () => others.agent());
      const lat: number[] = [];
      phase(`registration: ${n} sequential`);
      const r = await measured(c, async () => {
        for (const [i, a] of seq.entries()) {
          const t = nowMs();
          await a.register(seqKey, `seq-${i}`);
          lat.push(nowMs() - t);
          a.close();
        }
      });
      result.registrationSequential = {
        count: n,
        perSecond: round((n / r.wallMs) * 1000),
        latencyMs: summarize(lat),
        coordinatorCpuMsPerRegistration: round((r.coordinatorCpuPct * r.wallMs) / 100 / n, 2),
        ...costs(r),
      };
    };

    if (o.only.every((b) => b === 'registration')) {
      await sequential();
      phase('done');
      return result;
    }

    await sleep(1000);
    phase(`connect: ${n} agents over ${fleet.connections} TLS connections`);
    const conn = await measured(c, async () => {
      const t0 = nowMs();
      const fulls = fleet.watch(agents, (a) => a.hasFull);
      await Promise.all([pool(agents, 100, (a) => a.connect()), fulls.wait(waitMs, 'a full netmap')]);
      const full = nowMs() - t0;
      // Every agent then learns that the others came online.
      const settled = full + (await quiet(fleet, 1000, waitMs * 4));
      return { full, settled };
    });
    const missing = groups.reduce((s, g) => s + g.filter((a) => a.peers.size !== g.length - 1).length, 0);
    if (missing)
      throw new Error(`${missing} agents lack some of the other nodes of their project after connecting`);
    result.connect = {
      connections: fleet.connections,
      fullNetmapBytes: fleet.fullNetmapBytes,
      allFullNetmapsMs: round(conn.value.full),
      settledMs: round(conn.value.settled),
      messagesPerAgent: perAgent(fleet.messages, n),
      onlinePatchesPerAgent: perAgent(
        agents.reduce((s, a) => s + a.patches, 0),
        n,
      ),
      ...costs(conn),
      rssMiB: round(c.rssBytes() / MiB),
    };
    log(`connected; settled after ${round(conn.value.settled / 1000)} s`);

    if (want('propagation')) {
      const add: number[] = [];
      const del: number[] = [];
      const addAll: number[] = [];
      const delAll: number[] = [];
      const trials: Record<string, unknown>[] = [];
      phase(`propagation: ${o.trials} trials, ${mesh.length} agents`);
      const prop = await measured(c, async () => {
        for (let t = 0; t < o.trials; t++) {
          const name = `prop-${t}`;
          const w = fleet.watch(mesh, (a) => {
            const id = fleet.idOfName(name);
            return id !== undefined && a.hasPeer(id);
          });
          const node = others.agent();
          const res = await node.register(keys[0]!, name);
          const t0 = nowMs();
          node.close();
          await w.wait(waitMs, `new node ${name}`);
          const a = w.latencies(t0);
          add.push(...a);
          addAll.push(Math.max(...a));
          const id = res.node!.id;
          const d = fleet.watch(mesh, (a) => !a.hasPeer(id));
          await admin.call('deleteNode', { id, project: PROJECT });
          const t1 = nowMs();
          await d.wait(waitMs, `removal of ${name}`);
          const r = d.latencies(t1);
          del.push(...r);
          delAll.push(Math.max(...r));
          // Per agent: p99 and the slowest; trial 1 is the first change after everyone connected.
          const pick = ({ p50, p99, max }: Summary) => ({ p50, p99, max });
          trials.push({ trial: t + 1, addMs: pick(summarize(a)), deleteMs: pick(summarize(r)) });
          await sleep(100);
        }
      });
      result.propagation = {
        trials: o.trials,
        agents: mesh.length,
        addAllAgentsMs: summarize(addAll),
        addPerAgentMs: summarize(add),
        deleteAllAgentsMs: summarize(delAll),
        deletePerAgentMs: summarize(del),
        trialsMs: trials,
        ...costs(prop),
      };
    }

    if (want('idle')) {
      await sleep(2000);
      const m0 = fleet.messages;
      phase(`idle: ${o.idleSeconds} s`);
      const idle = await measured(c, () => sleep(o.idleSeconds * 1000));
      const rss = c.rssBytes();
      const heap = await c.metric(HEAP);
      result.idle = {
        seconds: o.idleSeconds,
        ...costs(idle),
        messagesPerAgentPerMinute: round(((fleet.messages - m0) / n / o.idleSeconds) * 60, 2),
        rssBeforeAgentsMiB: round(rssBefore / MiB),
        rssConnectedMiB: round(rss / MiB),
        rssPerAgentKiB: round((rss - rssBefore) / n / 1024),
        heapUsedBeforeAgentsMiB: round(heapBefore / MiB),
        heapUsedConnectedMiB: round(heap / MiB),
        heapUsedPerAgentKiB: round((heap - heapBefore) / n / 1024),
        // What V8 keeps committed (live objects and room for more) and memory outside the heap.
        heapTotalMiB: round((await c.metric(HEAP_TOTAL)) / MiB),
        externalMiB: round((await c.metric(EXTERNAL)) / MiB),
      };
      if (o.heapSnapshotDir) {
        snapshots.push(await c.heapSnapshot());
        result.heapSnapshots = snapshots;
      }
    }

    if (want('registration')) await sequential();

    if (want('policy')) {
      const m = mesh.length;
      const countA = mesh.filter((a) => a.tag === 'tag:a').length;
      const expected = (a: BenchAgent) => (a.tag === 'tag:a' ? m - countA : countA);
      const set: number[] = [];
      const clear: number[] = [];
      phase(`policy: ${o.policyTrials} trials of set + clear, ${m} agents`);
      const pol = await measured(c, async () => {
        for (let t = 0; t < o.policyTrials; t++) {
          let base = new Map(mesh.map((a) => [a, a.filters]));
          const w = fleet.watch(
            mesh,
            (a) => a.filters > base.get(a)! && a.sameTag === 0 && a.peers.size === expected(a),
          );
          await admin.call('setPolicy', { project: PROJECT, policy: POLICY });
          const t0 = nowMs();
          await w.wait(waitMs, 'the policy');
          set.push(Math.max(...w.latencies(t0)));
          await quiet(fleet, 300, waitMs);
          base = new Map(mesh.map((a) => [a, a.filters]));
          const back = fleet.watch(mesh, (a) => a.filters > base.get(a)! && a.peers.size === m - 1);
          await admin.call('setPolicy', { project: PROJECT, policy: '' });
          const t1 = nowMs();
          await back.wait(waitMs, 'the policy removal');
          clear.push(Math.max(...back.latencies(t1)));
          await quiet(fleet, 300, waitMs);
        }
      });
      result.policy = {
        trials: o.policyTrials,
        agents: m,
        description: 'tag:a may reach tag:b, half the nodes each; then the policy removed (everyone again)',
        setAllAgentsMs: summarize(set),
        clearAllAgentsMs: summarize(clear),
        ...costs(pol),
        rssBeforeMiB: pol.rssBeforeMiB,
        rssPeakMiB: pol.rssPeakMiB,
      };
    }

    if (want('storm')) {
      const trials: Record<string, unknown>[] = [];
      for (let t = 0; t < o.stormTrials; t++) {
        for (const a of agents) a.autoReconnect = true;
        const base = new Map(agents.map((a) => [a, a.fulls]));
        const msgs0 = fleet.messages;
        const tries0 = agents.reduce((s, a) => s + a.reconnects, 0);
        fleet.endings.clear();
        phase(`storm ${t + 1}/${o.stormTrials}: restarting the coordinator`);
        const m = await measured(c, async () => {
          const { stopMs, startMs } = await c.restart();
          const up = nowMs();
          const cpu0 = c.cpuSeconds();
          const w = fleet.watch(agents, (a) => a.hasFull && a.fulls > base.get(a)!);
          await w.wait(waitMs, 'a new full netmap');
          await quiet(fleet, 1000, waitMs * 4);
          return { stopMs, startMs, lat: w.latencies(up), settled: nowMs() - up - 1000, cpu0 };
        });
        trials.push({
          stopMs: m.value.stopMs,
          startMs: m.value.startMs,
          allReconnectedMs: round(Math.max(...m.value.lat)),
          perAgentMs: summarize(m.value.lat),
          settledMs: round(m.value.settled),
          coordinatorCpuSeconds: round(c.cpuSeconds() - m.value.cpu0, 2),
          attemptsPerAgent: perAgent(agents.reduce((s, a) => s + a.reconnects, 0) - tries0, n),
          messagesPerAgent: perAgent(fleet.messages - msgs0, n),
          streamEndings: Object.fromEntries(fleet.endings),
          // The coordinator's process changed during the restart: its CPU is counted above.
          ...costs(m, false),
        });
        for (const a of agents) a.autoReconnect = false;
      }
      result.storm = {
        backoff:
          '100 ms doubling to 2 s, each delay uniform in [d/2, d]; Register, then Sync, as the agent does',
        trials,
        allReconnectedMs: summarize(trials.map((x) => x.allReconnectedMs as number)),
      };
    }
    phase('done');
  } catch (err) {
    result.error = `${(err as Error).message} (in phase: ${result.phase})`;
    log(`failed: ${result.error}`);
  } finally {
    clearInterval(ticker);
    result.sequenceErrors = fleet.sequenceErrors;
    result.registerRetries = fleet.registerRetries + others.registerRetries;
    result.coordinatorLogTail = c.logTail.slice(-5);
    result.loadAverageAtEnd = loadavg()[0];
    fleet.close();
    others.close();
    await c.close();
  }
  return result;
}

function fmt(s: Summary | undefined): string {
  return s ? `p50 ${s.p50} p95 ${s.p95} p99 ${s.p99} max ${s.max} ms` : '-';
}

/** A few lines for people; the JSON has everything. */
export function humanSummary(r: Record<string, unknown>): string {
  const g = (k: string) => r[k] as Record<string, unknown> | undefined;
  const projects = (r.options as SuiteOptions | undefined)?.projects ?? 1;
  const lines = [`N = ${r.agents}${projects > 1 ? ` in ${projects} projects` : ''}`];
  if (g('registrationCold')) {
    const cold = g('registrationCold')!;
    const first = Object.keys(cold).find((k) => /^first\d+PerSecond$/.test(k))!;
    lines.push(
      `  registrations/s ${cold.concurrency} concurrent, cold  ${cold.perSecond} (${first.slice(5, -9)} first: ${cold[first]})`,
    );
  }
  if (g('registrationSequential'))
    lines.push(`  registrations/s sequential   ${g('registrationSequential')!.perSecond}`);
  if (g('connect'))
    lines.push(
      `  connect: all full netmaps ${g('connect')!.allFullNetmapsMs} ms, settled ${g('connect')!.settledMs} ms`,
    );
  if (projects > 1 && (g('propagation') || g('policy')))
    lines.push(
      `  propagation and policy: the ${(g('propagation') ?? g('policy'))!.agents} agents of one project`,
    );
  if (g('propagation')) {
    lines.push(`  propagation add (all agents)     ${fmt(g('propagation')!.addAllAgentsMs as Summary)}`);
    lines.push(`  propagation delete (all agents)  ${fmt(g('propagation')!.deleteAllAgentsMs as Summary)}`);
    const trials = g('propagation')!.trialsMs as { addMs: Summary; deleteMs: Summary }[];
    lines.push(
      `  per trial, add / delete p99 ms   ${trials.map((t) => `${t.addMs.p99}/${t.deleteMs.p99}`).join(' ')}`,
    );
  }
  if (g('policy')) {
    lines.push(`  policy set (all agents)          ${fmt(g('policy')!.setAllAgentsMs as Summary)}`);
    lines.push(`  policy removed (all agents)      ${fmt(g('policy')!.clearAllAgentsMs as Summary)}`);
  }
  if (g('idle'))
    lines.push(
      `  idle CPU ${g('idle')!.coordinatorCpuPct}% of a core, ${g('idle')!.rssPerAgentKiB} KiB RSS per agent`,
    );
  if (g('storm'))
    lines.push(`  reconnect storm, all agents back  ${fmt(g('storm')!.allReconnectedMs as Summary)}`);
  return lines.join('\n');
}

function signerOf(v: string): Signer {
  if (v !== 'node' && v !== 'agent') throw new Error('--signer must be node or agent');
  return v;
}

export function parseSuiteArgs(argv: string[]): { opts: SuiteOptions; json: boolean } {
  const { values } = parseArgs({
    args: argv,
    options: {
      agents: { type: 'string', default: '100' },
      projects: { type: 'string' },
      only: { type: 'string' },
      'agents-per-connection': { type: 'string' },
      concurrency: { type: 'string' },
      trials: { type: 'string' },
      'policy-trials': { type: 'string' },
      'storm-trials': { type: 'string' },
      'idle-seconds': { type: 'string' },
      'cpu-prof': { type: 'string' },
      'heap-snapshot': { type: 'string' },
      signer: { type: 'string' },
      json: { type: 'boolean', default: false },
    },
  });
  const num = (v: string | undefined, d: number, name: string) => {
    if (v === undefined) return d;
    const x = Number(v);
    if (!Number.isInteger(x) || x < 1) throw new Error(`--${name} must be a positive integer`);
    return x;
  };
  const agents = num(values.agents, 100, 'agents');
  const d = defaults(agents);
  const projects = num(values.projects, d.projects, 'projects');
  if (projects > agents) throw new Error('--projects must not exceed --agents');
  const only = values.only ? values.only.split(',').map((s) => s.trim()) : d.only;
  for (const b of only)
    if (!(BENCHMARKS as readonly string[]).includes(b))
      throw new Error(`--only: unknown benchmark "${b}" (one of ${BENCHMARKS.join(', ')})`);
  return {
    json: values.json ?? false,
    opts: {
      agents,
      projects,
      only: only as Benchmark[],
      agentsPerConnection: num(
        values['agents-per-connection'],
        d.agentsPerConnection,
        'agents-per-connection',
      ),
      concurrency: num(values.concurrency, d.concurrency, 'concurrency'),
      trials: num(values.trials, d.trials, 'trials'),
      policyTrials: num(values['policy-trials'], d.policyTrials, 'policy-trials'),
      stormTrials: num(values['storm-trials'], d.stormTrials, 'storm-trials'),
      idleSeconds: num(values['idle-seconds'], d.idleSeconds, 'idle-seconds'),
      signer: signerOf(values.signer ?? d.signer),
      cpuProfDir: values['cpu-prof'],
      heapSnapshotDir: values['heap-snapshot'],
    },
  };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { opts, json } = parseSuiteArgs(process.argv.slice(2));
  const r: Record<string, unknown> = {};
  const report = () => {
    process.stderr.write(`${humanSummary(r)}\n`);
    if (json) process.stdout.write(`${JSON.stringify({ machine: machineInfo(), result: r })}\n`);
    else process.stderr.write(`${JSON.stringify(r, null, 2)}\n`);
  };
  // Stopped from outside (e.g. bench/run.ts's time limit): report what was measured so far.
  process.once('SIGTERM', () => {
    r.error = `stopped from outside (in phase: ${r.phase})`;
    report();
    process.exit(1);
  });
  await runSuite(opts, r);
  report();
  process.exit(r.error ? 1 : 0);
}
