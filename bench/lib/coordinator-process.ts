// The coordinator under test: the real `bin/meshgate coordinator` in a child
// process of its own, so its CPU and memory can be read from /proc and the
// load generator does not share its event loop.
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { get } from 'node:https';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type AdminClient, connectAdmin } from '../../cli/admin-client.js';
import { BIN, stop } from '../../test/integration/process.js';

export interface CoordinatorOptions {
  /** Write a V8 CPU profile of the coordinator into this directory (node --cpu-prof). */
  cpuProfDir?: string;
  /** Let the coordinator write a V8 heap snapshot into this directory on SIGUSR2 (heapSnapshot()). */
  heapSnapshotDir?: string;
  /** Extra YAML configuration keys (coordinator/config.ts). */
  config?: Record<string, unknown>;
}

/** The configuration the benchmarks run with; only the registration limit differs from the defaults. */
export const BENCH_CONFIG = {
  // The default, 10/s with a burst of 100 per source address, would throttle a
  // load generator that registers thousands of machines from 127.0.0.1.
  registrationRate: { perSecond: 1_000_000, burst: 1_000_000 },
};

/**
 * The environment the systemd unit gives the coordinator (its Environment=
 * lines), so that the benchmark measures memory as deployed.
 */
export function unitEnvironment(
  unit = join(import.meta.dirname, '..', '..', 'deploy', 'meshgate-coordinator.service'),
): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of readFileSync(unit, 'utf8').split('\n')) {
    const m = /^Environment=(.*)$/.exec(line);
    if (!m) continue;
    for (const pair of m[1]!.trim().split(/\s+/)) {
      const i = pair.indexOf('=');
      env[pair.slice(0, i)] = pair.slice(i + 1);
    }
  }
  return env;
}

const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** A TCP port that is free now, so the coordinator can be restarted on the same one. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

export class CoordinatorProcess {
  proc: ChildProcess | null = null;
  fingerprint = '';
  httpPort = 0;
  /** The last lines the coordinator logged (warnings and errors), for diagnostics. */
  readonly logTail: string[] = [];
  private adminClient: AdminClient | null = null;
  private forget = () => {};

  private constructor(
    readonly dataDir: string,
    readonly grpcPort: number,
    private readonly opts: CoordinatorOptions,
  ) {}

  static async start(opts: CoordinatorOptions = {}): Promise<CoordinatorProcess> {
    const dataDir = mkdtempSync(join(tmpdir(), 'meshgate-bench-'));
    writeFileSync(join(dataDir, 'bench.yaml'), JSON.stringify({ ...BENCH_CONFIG, ...opts.config }), {
      mode: 0o600,
    });
    const c = new CoordinatorProcess(dataDir, await freePort(), opts);
    // A benchmark stopped from outside exits without close(): the coordinator
    // and its data dir must not outlive it.
    const cleanUp = () => {
      c.proc?.kill('SIGKILL');
      rmSync(dataDir, { recursive: true, force: true });
    };
    process.once('exit', cleanUp);
    c.forget = () => process.off('exit', cleanUp);
    try {
      await c.spawn();
    } catch (err) {
      await c.close();
      throw err;
    }
    return c;
  }

  get url(): string {
    return `grpcs://127.0.0.1:${this.grpcPort}`;
  }

  get pid(): number {
    return this.proc?.pid ?? 0;
  }

  private spawn(): Promise<void> {
    const nodeArgs = [
      ...(this.opts.cpuProfDir ? ['--cpu-prof', '--cpu-prof-dir', this.opts.cpuProfDir] : []),
      ...(this.opts.heapSnapshotDir
        ? ['--heapsnapshot-signal=SIGUSR2', '--diagnostic-dir', this.opts.heapSnapshotDir]
        : []),
    ];
    const proc = spawn(
      process.execPath,
      [
        ...nodeArgs,
        BIN,
        'coordinator',
        '--config',
        join(this.dataDir, 'bench.yaml'),
        '--data-dir',
        this.dataDir,
        '--grpc-listen',
        `127.0.0.1:${this.grpcPort}`,
        '--http-listen',
        '127.0.0.1:0',
        '--log-level',
        'warn',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...unitEnvironment() } },
    );
    this.proc = proc;
    proc.stderr!.setEncoding('utf8').on('data', (d: string) => {
      for (const line of d.split('\n')) if (line) this.logTail.push(line.slice(0, 500));
      this.logTail.splice(0, Math.max(0, this.logTail.length - 20));
    });
    return new Promise((resolve, reject) => {
      let out = '';
      proc.stdout!.setEncoding('utf8').on('data', (d: string) => {
        out += d;
        const http = /HTTPS?\s+\S+:(\d+)/.exec(out);
        const fp = /fingerprint\s+(sha256:[0-9a-f]{64})/.exec(out);
        if (http && fp) {
          this.httpPort = Number(http[1]);
          this.fingerprint = fp[1]!;
          resolve();
        }
      });
      proc.once('exit', (code, signal) =>
        reject(new Error(`coordinator exited (${code ?? signal}): ${this.logTail.join('\n')}`)),
      );
    });
  }

  /** The local admin socket: no API key needed, same handlers as the TCP admin API. */
  async admin(): Promise<AdminClient> {
    this.adminClient ??= await connectAdmin({ socket: join(this.dataDir, 'admin.sock'), output: 'json' });
    return this.adminClient;
  }

  /** user + system CPU seconds the coordinator has used so far. */
  cpuSeconds(): number {
    const stat = readFileSync(`/proc/${this.pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // Fields 14 and 15 of proc(5), counted from 1; `fields` starts at field 3.
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  }

  /** Resident set size in bytes. */
  rssBytes(): number {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${this.pid}/status`, 'utf8'));
    return Number(m?.[1] ?? 0) * 1024;
  }

  /** A value from the coordinator's /metrics, e.g. meshgate_nodejs_heap_size_used_bytes. */
  metric(name: string): Promise<number> {
    return new Promise((resolve, reject) => {
      get(
        // The certificate is the coordinator's own self-signed one; this is loopback.
        { host: '127.0.0.1', port: this.httpPort, path: '/metrics', rejectUnauthorized: false },
        (res) => {
          let body = '';
          res.setEncoding('utf8').on('data', (d: string) => {
            body += d;
          });
          res.on('end', () => {
            const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(body);
            resolve(m ? Number(m[1]) : Number.NaN);
          });
        },
      ).on('error', reject);
    });
  }

  /**
   * Writes a heap snapshot (needs `heapSnapshotDir`) and resolves with its
   * path once it is complete: V8 writes it synchronously, so the coordinator
   * answers /metrics again only when the file is done.
   */
  async heapSnapshot(): Promise<string> {
    const dir = this.opts.heapSnapshotDir;
    if (!dir) throw new Error('the coordinator was started without heapSnapshotDir');
    const before = new Set(readdirSync(dir));
    this.proc!.kill('SIGUSR2');
    for (;;) {
      await new Promise((r) => setTimeout(r, 500));
      const made = readdirSync(dir).find((f) => f.endsWith('.heapsnapshot') && !before.has(f));
      // A connection made while V8 writes the snapshot can be reset; asking again is enough.
      const answers = await this.metric('meshgate_nodejs_heap_size_used_bytes').catch(() => Number.NaN);
      if (made && Number.isFinite(answers)) return join(dir, made);
    }
  }

  /** SIGTERM (a clean shutdown) and wait for the exit. */
  async stop(): Promise<void> {
    this.adminClient?.close();
    this.adminClient = null;
    if (this.proc) await stop(this.proc);
    this.proc = null;
  }

  /** Starts again on the same data dir and port; resolves once it listens. */
  async restart(): Promise<{ stopMs: number; startMs: number }> {
    const t0 = performance.now();
    await this.stop();
    const t1 = performance.now();
    await this.spawn();
    return { stopMs: Math.round(t1 - t0), startMs: Math.round(performance.now() - t1) };
  }

  async close(): Promise<void> {
    await this.stop();
    rmSync(this.dataDir, { recursive: true, force: true });
    this.forget();
  }
}
