// Hosts for end-to-end tests as network namespaces joined by veth pairs. Every name carries a
// per-run id, and everything a Topology creates is removed again by destroy(), or by the exit and
// signal handlers when a run is interrupted, so runs neither collide nor leave anything behind.
import { type ChildProcess, execFileSync, spawn as spawnChild } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { WIREGUARD_GO_SOCKET_DIR } from '../../../agent/dataplane/backend.js';
import { run } from '../../../agent/dataplane/exec.js';
import { processAlive } from '../../../agent/pid.js';

export interface LinkOptions {
  addrA: string;
  addrB: string;
  prefix: number;
}

export interface Veth {
  /** Interface name inside host A (towards B) and inside host B (towards A). */
  ifA: string;
  ifB: string;
}

export class TopologyError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TopologyError';
  }
}

const HOST_NAME = /^[a-z][a-z0-9]{0,7}$/;
const STOP_GRACE_MS = 2_000;

const live = new Set<Topology>();
let handlersInstalled = false;

export class Topology {
  /** Five hex digits: short enough that `mg<id>w<n>` stays within 15 characters for interfaces. */
  readonly id = randomBytes(3).toString('hex').slice(0, 5);
  private readonly hosts = new Map<string, string>();
  private readonly processes = new Set<ChildProcess>();
  private readonly wgNames: string[] = [];
  private vethCount = 0;
  private destroyed = false;

  constructor() {
    installExitHandlers();
    live.add(this);
  }

  /** Creates a namespace for `name` with loopback up; returns the namespace's name. */
  async addHost(name: string): Promise<string> {
    if (!HOST_NAME.test(name))
      throw new TopologyError(`host name ${name}: use 1-8 of a-z 0-9, starting with a letter`);
    if (this.hosts.has(name)) throw new TopologyError(`host ${name} exists already`);
    const ns = `mg${this.id}-${name}`;
    this.hosts.set(name, ns);
    await run('ip', ['netns', 'add', ns]);
    await run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    return ns;
  }

  ns(host: string): string {
    const ns = this.hosts.get(host);
    if (!ns) throw new TopologyError(`no host ${host} in this topology`);
    return ns;
  }

  /** A WireGuard interface name unique to this run; its wireguard-go socket is removed on destroy. */
  wgName(): string {
    const name = `mg${this.id}w${this.wgNames.length}`;
    this.wgNames.push(name);
    return name;
  }

  /** A veth pair from `a` to `b`, made inside the namespaces, never in the host's own. */
  private async veth(a: string, b: string): Promise<Veth> {
    const n = this.vethCount++;
    const veth = { ifA: `v${n}-${b}`, ifB: `v${n}-${a}` };
    await run('ip', [
      '-n',
      this.ns(a),
      'link',
      'add',
      veth.ifA,
      'type',
      'veth',
      'peer',
      'name',
      veth.ifB,
      'netns',
      this.ns(b),
    ]);
    return veth;
  }

  private async address(host: string, dev: string, addr: string, prefix: number): Promise<void> {
    await run('ip', ['-n', this.ns(host), 'addr', 'add', `${addr}/${prefix}`, 'dev', dev]);
    await run('ip', ['-n', this.ns(host), 'link', 'set', dev, 'up']);
  }

  /** Joins two hosts with a veth pair. */
  async link(a: string, b: string, options: LinkOptions): Promise<Veth> {
    const veth = await this.veth(a, b);
    await this.address(a, veth.ifA, options.addrA, options.prefix);
    await this.address(b, veth.ifB, options.addrB, options.prefix);
    return veth;
  }

  /** A switch inside `host`: a bridge that plug() attaches other hosts to, for one shared LAN. */
  async addBridge(host: string, bridge = 'br0'): Promise<void> {
    await run('ip', ['-n', this.ns(host), 'link', 'add', bridge, 'type', 'bridge']);
    await run('ip', ['-n', this.ns(host), 'link', 'set', bridge, 'up']);
  }

  /** Plugs `host` into `bridge` of `switchHost` with a veth pair; only the end in `host` gets an address. */
  async plug(
    switchHost: string,
    bridge: string,
    host: string,
    options: { addr: string; prefix: number },
  ): Promise<Veth> {
    const veth = await this.veth(switchHost, host);
    const sw = this.ns(switchHost);
    await run('ip', ['-n', sw, 'link', 'set', veth.ifA, 'master', bridge]);
    await run('ip', ['-n', sw, 'link', 'set', veth.ifA, 'up']);
    await this.address(host, veth.ifB, options.addr, options.prefix);
    return veth;
  }

  exec(
    host: string,
    cmd: string,
    args: string[],
    options: { input?: string; timeoutMs?: number } = {},
  ): Promise<string> {
    return run(cmd, args, { ...options, netns: this.ns(host) });
  }

  /** Starts a long-running process in `host`; destroy() stops it. */
  spawn(host: string, cmd: string, args: string[], options: { stdin?: boolean } = {}): ChildProcess {
    const child = spawnChild('ip', ['netns', 'exec', this.ns(host), cmd, ...args], {
      stdio: [options.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'],
    });
    this.processes.add(child);
    child.on('exit', () => this.processes.delete(child));
    return child;
  }

  async addRoute(host: string, cidr: string, options: { via?: string; dev?: string }): Promise<void> {
    const args = ['-n', this.ns(host), 'route', 'add', cidr];
    if (options.via) args.push('via', options.via);
    if (options.dev) args.push('dev', options.dev);
    await run('ip', args);
  }

  async enableForwarding(host: string): Promise<void> {
    await this.exec(host, 'sysctl', ['-qw', 'net.ipv4.ip_forward=1', 'net.ipv6.conf.all.forwarding=1']);
  }

  /** Source NAT for everything leaving `outIf`, like a home router or a data-center firewall. */
  async masquerade(host: string, outIf: string, options: { randomFully?: boolean } = {}): Promise<void> {
    const flags = options.randomFully ? ' fully-random' : '';
    const script = [
      'table ip mgnat {',
      '  chain postrouting {',
      '    type nat hook postrouting priority srcnat; policy accept;',
      `    oifname "${outIf}" masquerade${flags}`,
      '  }',
      '}',
      '',
    ].join('\n');
    await this.exec(host, 'nft', ['-f', '-'], { input: script });
  }

  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    await Promise.all([...this.processes].map(stop));
    // Processes started by the code under test (e.g. wireguard-go) keep a namespace alive after
    // `ip netns del`, so whatever still runs inside one is stopped as well.
    for (const ns of this.hosts.values()) {
      for (const pid of await netnsPids(ns)) await stopPid(pid);
      await run('ip', ['netns', 'del', ns]).catch(() => {});
    }
    this.removeSockets();
    live.delete(this);
  }

  /** Synchronous last resort for process exit and signals: no grace period, but nothing left. */
  destroySync(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const child of this.processes) child.kill('SIGKILL');
    for (const ns of this.hosts.values()) {
      try {
        const pids = execFileSync('ip', ['netns', 'pids', ns], {
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', 'ignore'],
        });
        for (const pid of pids.split('\n').filter(Boolean)) killQuietly(Number(pid), 'SIGKILL');
        execFileSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
      } catch {
        // Already gone, or never fully created.
      }
    }
    this.removeSockets();
    live.delete(this);
  }

  private removeSockets(): void {
    for (const name of this.wgNames) {
      rmSync(`${WIREGUARD_GO_SOCKET_DIR}/${name}.sock`, { force: true });
      rmSync(`${WIREGUARD_GO_SOCKET_DIR}/${name}.log`, { force: true });
    }
  }
}

/** Resolves once `child` printed a line matching `pattern`; rejects on exit or timeout. */
export function waitForOutput(child: ChildProcess, pattern: RegExp, timeoutMs = 5_000): Promise<string> {
  return new Promise((resolve, reject) => {
    let seen = '';
    const timer = setTimeout(
      () => finish(new TopologyError(`no output matching ${pattern} within ${timeoutMs} ms: ${seen}`)),
      timeoutMs,
    );
    const onData = (b: Buffer) => {
      seen += b.toString();
      const m = pattern.exec(seen);
      if (m) finish(null, m[0]);
    };
    const onExit = (code: number | null) =>
      finish(new TopologyError(`process exited (${code}) before printing ${pattern}: ${seen}`));
    const finish = (err: Error | null, value = '') => {
      clearTimeout(timer);
      child.stdout?.off('data', onData);
      child.stderr?.off('data', onData);
      child.off('exit', onExit);
      if (err) reject(err);
      else resolve(value);
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    child.on('exit', onExit);
  });
}

async function netnsPids(ns: string): Promise<number[]> {
  const out = await run('ip', ['netns', 'pids', ns]).catch(() => '');
  return out.split('\n').filter(Boolean).map(Number);
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS);
  await gone;
  clearTimeout(timer);
}

async function stopPid(pid: number): Promise<void> {
  killQuietly(pid, 'SIGTERM');
  for (let waited = 0; waited < STOP_GRACE_MS; waited += 50) {
    if (!processAlive(pid)) return;
    await sleep(50);
  }
  killQuietly(pid, 'SIGKILL');
}

function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // It exited in the meantime.
  }
}

function installExitHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  const cleanAll = () => {
    for (const topology of live) topology.destroySync();
  };
  process.on('exit', cleanAll);
  for (const [signal, code] of [
    ['SIGINT', 130],
    ['SIGTERM', 143],
  ] as const) {
    process.once(signal, () => {
      cleanAll();
      process.exit(code);
    });
  }
}
