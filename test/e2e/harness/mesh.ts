// A meshgate lab on top of the namespace topology: the real coordinator and
// agents (bin/meshgate) as processes inside the hosts, key-only sshd, and
// helpers to ask agents for their status.
import type { ChildProcess } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { appendFileSync, chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { it, type TestContext } from 'node:test';
import { WIREGUARD_GO_SOCKET_DIR } from '../../../agent/dataplane/backend.js';
import { run } from '../../../agent/dataplane/exec.js';
import { agentStatus } from '../../../agent/localapi/client.js';
import type { AgentStatus } from '../../../agent/localapi/types.js';
import { type Topology, waitForOutput } from './netns.js';

export const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'meshgate');

export interface AgentHandle {
  name: string;
  host: string;
  proc: ChildProcess;
  socket: string;
  stateDir: string;
  iface: string;
  args: string[];
  log: string[];
}

export interface StartAgentOptions {
  keyFile: string;
  lockdown?: boolean;
  iface?: string;
  extra?: string[];
  /**
   * A private /run/wireguard for this agent: wireguard-go keeps its sockets there for all network
   * namespaces, so a fixed interface name (e.g. tailscale0) would collide with other runs without it.
   */
  privateWireguardDir?: boolean;
}

/** Builds dist once, so processes started in parallel do not race to compile. */
export function buildOnce(): void {
  execFileSync(process.execPath, [BIN, '--version'], { stdio: 'ignore' });
}

export async function until<T>(
  what: string,
  fn: () => Promise<T | undefined | false>,
  timeoutMs = 15_000,
  everyMs = 200,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline)
      throw new Error(
        `timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`,
      );
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export class MeshLab {
  readonly dir = mkdtempSync(join(tmpdir(), 'meshgate-e2e-'));
  readonly agents = new Map<string, AgentHandle>();
  coordinator: {
    host: string;
    address: string;
    proc: ChildProcess;
    fingerprint: string;
    url: string;
  } | null = null;
  private coordLog: string[] = [];
  /** When set, what the coordinator and agents print is also appended to this file, line by line. */
  logFile: string | null = null;
  /** When set, admin() keeps the commands' stderr (e.g. "project exists already") off the terminal. */
  quiet = false;

  /** Whether the lab dir (keys, state, logs) goes when the process exits without destroy(), e.g. on Ctrl-C. */
  removeOnExit = true;
  private readonly removeDir = () => {
    if (this.removeOnExit) rmSync(this.dir, { recursive: true, force: true });
  };

  constructor(readonly topo: Topology) {
    chmodSync(this.dir, 0o700);
    process.once('exit', this.removeDir);
  }

  get dataDir(): string {
    return join(this.dir, 'coordinator');
  }

  async startCoordinator(host: string, address: string, extra: string[] = []): Promise<void> {
    const proc = this.topo.spawn(host, process.execPath, [
      BIN,
      'coordinator',
      '--data-dir',
      this.dataDir,
      '--grpc-listen',
      `${address}:7443`,
      '--http-listen',
      `${address}:7480`,
      '--log-level',
      'warn',
      ...extra,
    ]);
    proc.stderr?.on('data', (d) => {
      this.coordLog.push(String(d));
      this.tee('coordinator', d);
    });
    const line = await waitForOutput(proc, /fingerprint\s+sha256:[0-9a-f]{64}/, 30_000);
    const fingerprint = line.split(/\s+/).pop()!;
    this.coordinator = { host, address, proc, fingerprint, url: `grpcs://${address}:7443` };
  }

  async stopCoordinator(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const c = this.coordinator;
    if (!c) return;
    await stopProcess(c.proc, signal);
  }

  /** Runs `meshgate` on the coordinator's admin socket (unix sockets are not namespaced). */
  admin(args: string[]): string {
    return execFileSync(process.execPath, [BIN, ...args, '--socket', join(this.dataDir, 'admin.sock')], {
      encoding: 'utf8',
      ...(this.quiet ? { stdio: ['ignore', 'pipe', 'pipe'] as const } : {}),
    });
  }

  /** Like admin(), without blocking the event loop (e.g. while something else is measured). */
  adminAsync(args: string[]): Promise<string> {
    return run(process.execPath, [BIN, ...args, '--socket', join(this.dataDir, 'admin.sock')]);
  }

  /** `meshgate ARGS --socket AGENT_SOCKET` (status, ping, ssh, down) in `host`, as an operator types it. */
  local(host: string, via: string, args: string[], timeoutMs = 20_000): Promise<string> {
    const socket = this.agents.get(via)!.socket;
    return this.topo.exec(host, process.execPath, [BIN, ...args, '--socket', socket], { timeoutMs });
  }

  /** The --auth-key-file agent `name` was last started with. */
  keyFileOf(name: string): string {
    const args = this.agents.get(name)!.args;
    return args[args.indexOf('--auth-key-file') + 1]!;
  }

  /** An auth key written to a 0600 file, as install.sh would. */
  authKey(project: string, opts: { reusable?: boolean; ephemeral?: boolean; tags?: string[] } = {}): string {
    try {
      this.admin(['projects', 'create', project]);
    } catch {
      // exists already
    }
    const args = ['keys', 'create', '--project', project, '-o', 'json'];
    if (opts.reusable) args.push('--reusable');
    if (opts.ephemeral) args.push('--ephemeral');
    if (opts.tags?.length) args.push('--tags', opts.tags.join(','));
    const key = JSON.parse(this.admin(args)).key as string;
    const file = join(this.dir, `key-${Math.random().toString(36).slice(2)}`);
    writeFileSync(file, `${key}\n`, { mode: 0o600 });
    return file;
  }

  startAgent(host: string, name: string, opts: StartAgentOptions): AgentHandle {
    const c = this.coordinator!;
    const old = this.agents.get(name);
    const stateDir = old?.stateDir ?? join(this.dir, `agent-${name}`);
    const socket = old?.socket ?? join(this.dir, `${name}.sock`);
    const iface = old?.iface ?? opts.iface ?? this.topo.wgName();
    const args = [
      BIN,
      'agent',
      '--coordinator',
      c.url,
      '--fingerprint',
      c.fingerprint,
      '--auth-key-file',
      opts.keyFile,
      '--state-dir',
      stateDir,
      '--interface',
      iface,
      '--backend',
      'wireguard-go',
      '--socket',
      socket,
      '--hostname',
      name,
      '--log-level',
      'debug',
      ...(opts.lockdown ? ['--lockdown-ssh'] : []),
      ...(opts.extra ?? []),
    ];
    const proc = opts.privateWireguardDir
      ? this.topo.spawn(host, 'unshare', [
          '--mount',
          '--propagation',
          'private',
          'sh',
          '-c',
          `mkdir -p ${WIREGUARD_GO_SOCKET_DIR} && mount -t tmpfs -o mode=0700 tmpfs ${WIREGUARD_GO_SOCKET_DIR} && exec "$@"`,
          'agent',
          process.execPath,
          ...args,
        ])
      : this.topo.spawn(host, process.execPath, args);
    const log: string[] = [];
    proc.stderr?.on('data', (d) => {
      log.push(String(d));
      this.tee(name, d);
    });
    proc.stdout?.on('data', (d) => {
      log.push(String(d));
      this.tee(name, d);
    });
    const handle = { name, host, proc, socket, stateDir, iface, args, log };
    this.agents.set(name, handle);
    return handle;
  }

  async stopAgent(name: string, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const a = this.agents.get(name);
    if (a) await stopProcess(a.proc, signal);
  }

  status(name: string): Promise<AgentStatus> {
    return agentStatus(this.agents.get(name)!.socket);
  }

  /** Waits until agent `name` has a peer named `peer` (or, with present=false, has none). */
  async waitForPeer(name: string, peer: string, present = true, timeoutMs = 15_000): Promise<AgentStatus> {
    return until(
      `${name} ${present ? 'to see' : 'to lose'} ${peer}`,
      async () => {
        const s = await this.status(name);
        return s.peers.some((p) => p.name === peer) === present && s;
      },
      timeoutMs,
    );
  }

  /** Mesh IPv4 of an agent, from its own status. */
  async meshIp(name: string): Promise<string> {
    return until(`${name} to register`, async () => (await this.status(name)).self.ipAddresses[0], 20_000);
  }

  /** Key-only sshd on port 22 in `host`; returns the client key to use. */
  async startSshd(host: string): Promise<void> {
    const dir = join(this.dir, `sshd-${host}`);
    mkdirSync(dir, { mode: 0o700 });
    mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'host_key')]);
    const config = [
      'Port 22',
      `HostKey ${join(dir, 'host_key')}`,
      `PidFile ${join(dir, 'sshd.pid')}`,
      `AuthorizedKeysFile ${this.clientKey()}.pub`,
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'PermitRootLogin prohibit-password',
      'StrictModes no',
      'UsePAM no',
      'LogLevel ERROR',
    ];
    writeFileSync(join(dir, 'sshd_config'), `${config.join('\n')}\n`, { mode: 0o600 });
    const proc = this.topo.spawn(host, '/usr/sbin/sshd', ['-D', '-e', '-f', join(dir, 'sshd_config')]);
    await until(
      `sshd in ${host}`,
      async () => (await this.topo.exec(host, 'ss', ['-ltn'])).includes(':22 ') || proc.exitCode !== null,
      10_000,
    );
    if (proc.exitCode !== null) throw new Error(`sshd in ${host} exited with ${proc.exitCode}`);
  }

  private key = '';

  /** The operator's SSH key, made once per lab. */
  clientKey(): string {
    if (!this.key) {
      this.key = join(this.dir, 'id_ed25519');
      execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', this.key]);
    }
    return this.key;
  }

  /** ssh options for root logins with the operator's key (or a copy of it at `key`). */
  sshOptions(key = this.clientKey()): string[] {
    return [
      '-i',
      key,
      '-o',
      'StrictHostKeyChecking=no',
      '-o',
      'UserKnownHostsFile=/dev/null',
      '-o',
      'ConnectTimeout=4',
      '-o',
      'BatchMode=yes',
      '-o',
      'LogLevel=ERROR',
      '-l',
      'root',
    ];
  }

  /** `meshgate ssh NODE -- … true` from `host` through agent `via`; resolves to the exit code. */
  async meshSsh(host: string, via: string, node: string, command = 'true'): Promise<number> {
    try {
      await this.topo.exec(
        host,
        process.execPath,
        [BIN, 'ssh', node, '--socket', this.agents.get(via)!.socket, '--', ...this.sshOptions(), command],
        { timeoutMs: 20_000 },
      );
      return 0;
    } catch (err) {
      return (err as { exitCode?: number }).exitCode ?? 1;
    }
  }

  /** Plain ssh to an address from `host`; resolves to the exit code. */
  async ssh(host: string, address: string, command = 'true'): Promise<number> {
    try {
      await this.topo.exec(host, 'ssh', [...this.sshOptions(), address, command], { timeoutMs: 20_000 });
      return 0;
    } catch (err) {
      return (err as { exitCode?: number }).exitCode ?? 1;
    }
  }

  private tee(source: string, chunk: unknown): void {
    if (!this.logFile) return;
    const lines = String(chunk).replace(/\n$/, '').split('\n');
    appendFileSync(this.logFile, lines.map((l) => `${source}: ${l}\n`).join(''), { mode: 0o600 });
  }

  /** What the processes printed, for a failing test's message. */
  logs(): string {
    const parts = [`--- coordinator\n${this.coordLog.join('')}`];
    for (const a of this.agents.values())
      parts.push(`--- agent ${a.name}\n${a.log.join('').split('\n').slice(-40).join('\n')}`);
    return parts.join('\n');
  }

  async destroy(): Promise<void> {
    await this.topo.destroy();
    rmSync(this.dir, { recursive: true, force: true });
    process.off('exit', this.removeDir);
  }
}

export function stopProcess(proc: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  return new Promise((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    proc.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    proc.kill(signal);
  });
}

/** `it` for the steps of one lab: a failing step makes `printLogsIfFailed` show the processes' output. */
export function labSteps(lab: () => MeshLab | undefined) {
  let failed = false;
  return {
    step(name: string, fn: (t: TestContext) => Promise<void>) {
      it(name, async (t) => {
        try {
          await fn(t);
        } catch (err) {
          failed = true;
          throw err;
        }
      });
    },
    /** For setup outside a step, e.g. in `before`. */
    markFailed() {
      failed = true;
    },
    printLogsIfFailed() {
      const l = lab();
      if (failed && l) console.error(l.logs());
    },
  };
}
