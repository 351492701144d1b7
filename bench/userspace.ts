// The userspace node against the root agent's wireguard-go tunnel, in network
// namespaces (needs root, wireguard-go, wg, ip, nft, ssh, sshd): one JSON
// object on stdout, a summary on stderr.
//
//   node --import tsx bench/userspace.ts                          everything
//   node --import tsx bench/userspace.ts --only throughput,upload --mb 128 --runs 3
//   node --import tsx bench/userspace.ts --only throughput --cpu-prof /tmp/prof
//   node --import tsx bench/userspace.ts --only ssh --ssh-runs 10
//
// upload: the same in the other direction, op → fw, timed at fw.
// throughput: fw serves MB megabytes per connection; op reads them once
// through its own agent (wireguard-go, kernel TCP) and once through
// `meshgate connect` (WireGuard and TCP in one Node process). Both are timed
// from the first byte to the last, so joining the mesh is not counted.
// ssh: time from starting `meshgate ssh --userspace fw1 -- echo ready` to
// "ready" on its stdout: process start, join, handshake, SSH login; and the
// phases apart: `meshgate --version` (loading the CLI), joinMesh() until the
// first netmap, and dial('fw1', 22) (WireGuard and TCP handshakes).
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { BIN, buildOnce, MeshLab, until } from '../test/e2e/harness/mesh.js';
import { Topology } from '../test/e2e/harness/netns.js';
import { star } from '../test/e2e/harness/star.js';
import { missingPrerequisites } from '../test/e2e/harness/tools.js';
import { type ProfileSummary, summarizeProfile } from './lib/profile.js';
import { log, machineInfo } from './lib/report.js';
import { round, summarize } from './lib/stats.js';

const { values } = parseArgs({
  options: {
    only: { type: 'string', default: 'throughput,upload,ssh' },
    mb: { type: 'string', default: '64' },
    runs: { type: 'string', default: '3' },
    'ssh-runs': { type: 'string', default: '5' },
    'cpu-prof': { type: 'string' },
  },
});
const only = new Set(values.only!.split(','));
const BYTES = Number(values.mb) * 1024 * 1024;
const RUNS = Number(values.runs);
const SSH_RUNS = Number(values['ssh-runs']);

const missing = missingPrerequisites(['ip', 'wg', 'wireguard-go', 'nft', 'ssh', 'sshd']);
if (missing) {
  console.error(`userspace benchmarks: ${missing}`);
  process.exit(1);
}

/** Serves `n` bytes per connection, as fast as the socket takes them. */
const SOURCE = `
const n = Number(process.argv[1]);
const block = require('node:crypto').randomBytes(1 << 20);
require('node:net').createServer({ allowHalfOpen: true }, (c) => {
  let sent = 0;
  const more = () => {
    while (sent < n) {
      const b = block.subarray(0, Math.min(block.length, n - sent));
      sent += b.length;
      if (!c.write(b)) return c.once('drain', more);
    }
    c.end();
  };
  more();
}).listen(9000, () => console.log('listening'));
`;

/** Reads a TCP connection (HOST PORT) or stdin to the end; prints bytes and ms from first to last byte. */
const SINK = `
const [host, port] = process.argv.slice(2);
const s = host ? require('node:net').connect(Number(port), host) : process.stdin;
let bytes = 0, first = 0;
s.on('data', (d) => { if (!bytes) first = performance.now(); bytes += d.length; });
s.on('end', () => console.log(JSON.stringify({ bytes, ms: performance.now() - first })));
`;

/** The phases of `meshgate ssh` before ssh itself: joining (register, first netmap) and dialing port 22. */
const PHASES = `
import { readFileSync } from 'node:fs';
const [lib, coordinator, fingerprint, keyFile] = process.argv.slice(2);
const { joinMesh } = await import(lib);
let t = performance.now();
const mesh = await joinMesh({ coordinator, fingerprint, authKey: readFileSync(keyFile, 'utf8').trim(), hostname: 'bench-phases' });
const joinMs = performance.now() - t;
t = performance.now();
const socket = await mesh.dial('fw1', 22);
const dialMs = performance.now() - t;
socket.destroy();
await mesh.close();
console.log(JSON.stringify({ joinMs, dialMs }));
`;

/** Takes connections on 9001 and prints, per connection, bytes and ms from first to last byte. */
const SINK_SERVER = `
require('node:net').createServer((c) => {
  let bytes = 0, first = 0;
  c.on('data', (d) => { if (!bytes) first = performance.now(); bytes += d.length; });
  c.on('end', () => { console.log(JSON.stringify({ bytes, ms: performance.now() - first })); c.end(); });
}).listen(9001, () => console.log('listening'));
`;

interface Transfer {
  bytes: number;
  ms: number;
}

const mbps = (t: Transfer) => (t.bytes * 8) / 1e6 / (t.ms / 1000);

/** The agent's transfers against meshgate connect's, with the profile of the first of these in `profDir`. */
function comparison(agent: Transfer[], userspace: Transfer[], profDir: string) {
  const a = summarize(agent.map(mbps));
  const u = summarize(userspace.map(mbps));
  const file = readdirSync(profDir).find((f) => f.endsWith('.cpuprofile'));
  const profile: ProfileSummary | null = file ? summarizeProfile(join(profDir, file), 20) : null;
  return {
    megabytes: Number(values.mb),
    runs: RUNS,
    agentWireguardGoMbitPerS: a,
    userspaceConnectMbitPerS: u,
    samples: { agent: agent.map((t) => round(mbps(t))), userspace: userspace.map((t) => round(mbps(t))) },
    ratio: round(u.p50 / a.p50, 3),
    profile,
  };
}

async function transfer(lab: MeshLab, command: string): Promise<Transfer> {
  const out = await lab.topo.exec('op', 'bash', ['-c', command], { timeoutMs: 300_000 });
  const t = JSON.parse(out.trim().split('\n').pop()!) as Transfer;
  if (t.bytes !== BYTES) throw new Error(`received ${t.bytes} of ${BYTES} bytes`);
  return t;
}

async function main(): Promise<Record<string, unknown>> {
  buildOnce();
  const lab = new MeshLab(new Topology());
  const profDir = values['cpu-prof'] ?? mkdtempSync(join(tmpdir(), 'meshgate-prof-'));
  const results: Record<string, unknown> = { loadBefore: loadavg().map((l) => round(l, 2)) };
  try {
    const addr = await star(lab.topo, ['coord', 'fw', 'op']);
    await lab.startCoordinator('coord', addr.coord!);
    await lab.startSshd('fw');
    const reusable = lab.authKey('bench', { reusable: true });
    lab.startAgent('fw', 'fw1', { keyFile: reusable, lockdown: true });
    lab.startAgent('op', 'op-agent', { keyFile: reusable });
    await lab.waitForPeer('op-agent', 'fw1');
    const fwIp = await lab.meshIp('fw1');
    await until(
      'the agent tunnel',
      async () => Boolean(await lab.topo.exec('op', 'ping', ['-c', '1', '-W', '1', fwIp])),
      20_000,
    );
    const c = lab.coordinator!;
    const joinArgs = (name: string) =>
      [
        '--coordinator',
        c.url,
        '--fingerprint',
        c.fingerprint,
        '--auth-key-file',
        lab.authKey('bench', { ephemeral: true }),
        '--hostname',
        name,
      ].join(' ');

    if (only.has('throughput')) {
      const sink = join(lab.dir, 'sink.js');
      writeFileSync(sink, SINK);
      const source = lab.topo.spawn('fw', process.execPath, ['-e', SOURCE, String(BYTES)]);
      await until('the source', async () => source.stdout?.read()?.toString().includes('listening') ?? false);
      const agent: Transfer[] = [];
      const userspace: Transfer[] = [];
      for (let r = 0; r < RUNS; r++) {
        log(
          `throughput run ${r + 1}/${RUNS}: ${values.mb} MB through the agent, then through meshgate connect`,
        );
        agent.push(await transfer(lab, `"${process.execPath}" ${sink} ${fwIp} 9000`));
        const prof = r === 0 ? `--cpu-prof --cpu-prof-dir=${profDir}` : '';
        userspace.push(
          await transfer(
            lab,
            `set -o pipefail; "${process.execPath}" ${prof} ${BIN} connect ${joinArgs(`bench-connect-${r}`)} fw1 9000 </dev/null | "${process.execPath}" ${sink}`,
          ),
        );
      }
      results.throughput = comparison(agent, userspace, profDir);
      source.kill();
    }

    if (only.has('upload')) {
      const server = lab.topo.spawn('fw', process.execPath, ['-e', SINK_SERVER]);
      const lines: string[] = [];
      let buf = '';
      server.stdout?.on('data', (d) => {
        buf += d;
        for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
          lines.push(buf.slice(0, i));
          buf = buf.slice(i + 1);
        }
      });
      await until('the sink', async () => lines.includes('listening'));
      const received = async (command: string): Promise<Transfer> => {
        const before = lines.length;
        await lab.topo.exec('op', 'bash', ['-c', command], { timeoutMs: 300_000 });
        await until('the sink to report', async () => lines.length > before, 30_000, 50);
        const t = JSON.parse(lines[before]!) as Transfer;
        if (t.bytes !== BYTES) throw new Error(`received ${t.bytes} of ${BYTES} bytes`);
        return t;
      };
      const agent: Transfer[] = [];
      const userspace: Transfer[] = [];
      for (let r = 0; r < RUNS; r++) {
        log(`upload run ${r + 1}/${RUNS}: ${values.mb} MB op → fw through the agent, then meshgate connect`);
        agent.push(await received(`head -c ${BYTES} /dev/zero > /dev/tcp/${fwIp}/9001`));
        const prof = r === 0 ? `--cpu-prof --cpu-prof-dir=${join(profDir, 'upload')}` : '';
        userspace.push(
          await received(
            `set -o pipefail; head -c ${BYTES} /dev/zero | "${process.execPath}" ${prof} ${BIN} connect ${joinArgs(`bench-upload-${r}`)} fw1 9001 >/dev/null`,
          ),
        );
      }
      results.upload = comparison(agent, userspace, join(profDir, 'upload'));
      server.kill();
    }

    if (only.has('ssh')) {
      const phases = join(lab.dir, 'phases.mjs');
      writeFileSync(phases, PHASES);
      const startup: number[] = [];
      const joined: number[] = [];
      const dialed: number[] = [];
      for (let r = 0; r < SSH_RUNS; r++) {
        let t0 = performance.now();
        await lab.topo.exec('op', process.execPath, [BIN, '--version']);
        startup.push(performance.now() - t0);
        t0 = performance.now();
        const out = await lab.topo.exec('op', process.execPath, [
          phases,
          join(import.meta.dirname, '..', 'dist', 'userspace', 'index.js'),
          c.url,
          c.fingerprint,
          lab.authKey('bench', { ephemeral: true }),
        ]);
        const p = JSON.parse(out) as { joinMs: number; dialMs: number };
        joined.push(p.joinMs);
        dialed.push(p.dialMs);
      }
      results.sshPhases = {
        runs: SSH_RUNS,
        cliStartupMs: summarize(startup),
        joinMs: summarize(joined),
        dialPort22Ms: summarize(dialed),
      };
      const options = lab.sshOptions().join(' ');
      const times: number[] = [];
      for (let r = 0; r < SSH_RUNS; r++) {
        const command = `exec "${process.execPath}" ${BIN} ssh --userspace ${joinArgs(`bench-ssh-${r}`)} fw1 -- ${options} echo ready`;
        const started = performance.now();
        const child = spawn('ip', ['netns', 'exec', lab.topo.ns('op'), 'bash', '-c', command], {
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        let out = '';
        let err = '';
        child.stderr.on('data', (d) => {
          err += d;
        });
        const ready = await new Promise<number>((resolve, reject) => {
          child.stdout.on('data', (d) => {
            out += d;
            if (out.includes('ready')) resolve(performance.now() - started);
          });
          child.on('exit', (code) => reject(new Error(`meshgate ssh exited ${code} without output: ${err}`)));
        });
        await new Promise<void>((r) => child.once('exit', () => r()));
        times.push(ready);
        log(`ssh run ${r + 1}/${SSH_RUNS}: ${Math.round(ready)} ms to output`);
      }
      results.ssh = { runs: SSH_RUNS, msToOutput: summarize(times), samples: times.map((t) => round(t)) };
    }
    results.loadAfter = loadavg().map((l) => round(l, 2));
    return results;
  } finally {
    await lab.destroy();
    if (!values['cpu-prof']) rmSync(profDir, { recursive: true, force: true });
  }
}

const results = await main();
process.stdout.write(
  `${JSON.stringify({ benchmark: 'userspace', machine: machineInfo(), inputs: values, results }, null, 2)}\n`,
);
const s = results as {
  throughput?: {
    agentWireguardGoMbitPerS: { p50: number };
    userspaceConnectMbitPerS: { p50: number };
    ratio: number;
  };
  upload?: {
    agentWireguardGoMbitPerS: { p50: number };
    userspaceConnectMbitPerS: { p50: number };
    ratio: number;
  };
  ssh?: { msToOutput: { p50: number; max: number } };
};
if (s.throughput)
  log(
    `throughput: agent (wireguard-go) ${s.throughput.agentWireguardGoMbitPerS.p50} Mbit/s, meshgate connect ${s.throughput.userspaceConnectMbitPerS.p50} Mbit/s (${s.throughput.ratio})`,
  );
if (s.upload)
  log(
    `upload: agent (wireguard-go) ${s.upload.agentWireguardGoMbitPerS.p50} Mbit/s, meshgate connect ${s.upload.userspaceConnectMbitPerS.p50} Mbit/s (${s.upload.ratio})`,
  );
if (s.ssh) log(`meshgate ssh to output: median ${s.ssh.msToOutput.p50} ms, max ${s.ssh.msToOutput.max} ms`);
