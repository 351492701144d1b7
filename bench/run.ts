// The coordinator benchmark suite at several sizes; one JSON object on stdout
// (inputs, machine, results), a short summary on stderr.
//
//   npm run bench                                   sizes 100 and 1,000 (about 10 minutes)
//   npm run bench -- --sizes 100,1000,10000         the full record
//   npm run bench -- --sizes 1000 --only propagation,idle --idle-seconds 30
//   npm run bench -- --sizes 10000 --projects 100   10,000 agents in projects of 100
//
// Each size runs in a child process of its own (bench/coordinator.ts), which
// in turn starts the coordinator under test as its own child process.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { humanSummary } from './coordinator.js';
import { log, machineInfo } from './lib/report.js';

const { values } = parseArgs({
  options: {
    sizes: { type: 'string', default: '100,1000' },
    projects: { type: 'string', default: '1' },
    only: { type: 'string' },
    'agents-per-connection': { type: 'string' },
    'idle-seconds': { type: 'string' },
    trials: { type: 'string' },
    'policy-trials': { type: 'string' },
    'storm-trials': { type: 'string' },
    concurrency: { type: 'string' },
    'cpu-prof': { type: 'string' },
    signer: { type: 'string' },
    /** Per size; a size that takes longer is stopped and reported with what it measured. */
    'size-timeout-minutes': { type: 'string', default: '60' },
  },
});
const sizes = values.sizes!.split(',').map((s) => {
  const n = Number(s.replace(/_/g, ''));
  if (!Number.isInteger(n) || n < 2) throw new Error(`--sizes: "${s}" is not a number of agents`);
  return n;
});
const projects = Number(values.projects);
if (!Number.isInteger(projects) || projects < 1 || projects > Math.min(...sizes))
  throw new Error('--projects must be a positive integer no larger than the smallest size');
const passThrough = (
  [
    'projects',
    'only',
    'agents-per-connection',
    'idle-seconds',
    'trials',
    'policy-trials',
    'storm-trials',
    'concurrency',
    'cpu-prof',
    'signer',
  ] as const
).flatMap((k) => (values[k] === undefined ? [] : [`--${k}`, values[k]!]));
const timeoutMs = Number(values['size-timeout-minutes']) * 60_000;

/** Runs one size; resolves with its result, or with an error record. */
function runSize(agents: number): Promise<Record<string, unknown>> {
  return new Promise((resolve) => {
    const child = spawn(
      process.execPath,
      [
        // 10,000 agents hold more than the default heap limit while full netmaps arrive.
        '--max-old-space-size=8192',
        '--import',
        'tsx',
        join(import.meta.dirname, 'coordinator.ts'),
        '--agents',
        String(agents),
        '--json',
        ...passThrough,
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
    });
    const timer = setTimeout(() => {
      log(`N = ${agents}: over ${values['size-timeout-minutes']} minutes, stopping it`);
      child.kill('SIGTERM');
      setTimeout(() => child.kill('SIGKILL'), 60_000).unref();
    }, timeoutMs);
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      const last = out.trim().split('\n').pop() ?? '';
      try {
        resolve((JSON.parse(last) as { result: Record<string, unknown> }).result);
      } catch {
        resolve({ agents, error: `benchmark process exited (${code ?? signal}) without a result` });
      }
    });
  });
}

const startedAt = new Date().toISOString();
const results: Record<string, unknown>[] = [];
for (const n of sizes) {
  log(`=== N = ${n}`);
  results.push(await runSize(n));
}
process.stdout.write(
  `${JSON.stringify({
    benchmark: 'coordinator',
    command: ['npm run bench --', ...process.argv.slice(2)].join(' '),
    startedAt,
    finishedAt: new Date().toISOString(),
    machine: machineInfo(),
    inputs: { ...values, sizes, projects },
    results,
  })}\n`,
);
process.stderr.write('\nsummary\n');
for (const r of results)
  process.stderr.write(`${humanSummary(r)}${r.error ? `\n  ERROR: ${r.error}` : ''}\n`);
