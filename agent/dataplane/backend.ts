// Creates the WireGuard interface: a kernel link where the module exists, otherwise a supervised
// wireguard-go process that is started again, with backoff, whenever it dies.
import { type ChildProcess, spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { CommandError, inNetns, MissingToolError, run } from './exec.js';
import { assertInterfaceName } from './ifname.js';

export type Backend = 'auto' | 'kernel' | 'wireguard-go';

export type BackendEvent =
  | { kind: 'exited'; code: number | null; signal: string | null; output: string }
  | { kind: 'restarted'; attempt: number }
  | { kind: 'restart-failed'; attempt: number; error: Error };

export interface CreateInterfaceOptions {
  name: string;
  backend: Backend;
  netns?: string;
  /** Called after wireguard-go was restarted; the new interface is empty, so re-apply everything. */
  onRestart?: () => Promise<void> | void;
  onEvent?: (event: BackendEvent) => void;
  /** First delay before a restart; doubles per failure up to maxBackoffMs. */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  readyTimeoutMs?: number;
}

export interface WgInterface {
  readonly name: string;
  readonly backend: 'kernel' | 'wireguard-go';
  /**
   * Creates the interface again when someone deleted it; true when it had to. wireguard-go exits
   * when its interface goes and is restarted by its supervisor, so only the kernel link needs this.
   */
  ensure(): Promise<boolean>;
  /** Removes the interface. */
  destroy(): Promise<void>;
  /**
   * The agent stops but the node stays in the mesh: a kernel interface stays with its peers, so
   * traffic (an SSH session over the mesh) survives an agent restart or upgrade; wireguard-go's
   * interface goes with its process.
   */
  release(): Promise<void>;
  /**
   * The agent restarts into another version: everything stays as it is (a wireguard-go process
   * keeps running, detached), and the next agent adopts the interface with its peers.
   */
  detach(): void;
}

export class BackendError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BackendError';
  }
}

/** wireguard-go's control sockets live here for every network namespace of the host. */
export const WIREGUARD_GO_SOCKET_DIR = '/var/run/wireguard';

export async function createInterface(options: CreateInterfaceOptions): Promise<WgInterface> {
  assertInterfaceName(options.name);
  if (options.backend !== 'kernel' && (await wireguardGoRunning(options.name, options.netns))) {
    // Left running by the agent before this one (a restart into a new version): adopt it.
    return new WireGuardGo(options, true);
  }
  if (options.backend !== 'wireguard-go') {
    const kernel = await tryKernel(options.name, options.netns);
    if (kernel === 'created') return kernelInterface(options.name, options.netns);
    if (options.backend === 'kernel') {
      throw new BackendError(
        `kernel has no WireGuard support (${kernel.reason}): load the wireguard module or use --backend wireguard-go`,
      );
    }
  }
  const proc = new WireGuardGo(options);
  await proc.start();
  return proc;
}

async function tryKernel(name: string, netns?: string): Promise<'created' | { reason: string }> {
  try {
    await run('ip', ['link', 'add', name, 'type', 'wireguard'], { netns });
    return 'created';
  } catch (e) {
    if (!(e instanceof CommandError)) throw e;
    if (/File exists/.test(e.stderr)) {
      // A restarted agent finds its own interface again; anything else by that name is not ours.
      const [info] = JSON.parse(await run('ip', ['-d', '-j', 'link', 'show', 'dev', name], { netns })) as {
        linkinfo?: { info_kind?: string };
      }[];
      if (info?.linkinfo?.info_kind === 'wireguard') return 'created';
      throw new BackendError(`interface ${name} already exists and is not a WireGuard interface`);
    }
    return { reason: e.message };
  }
}

/** A wireguard-go process answers on the interface's control socket. */
async function wireguardGoRunning(name: string, netns?: string): Promise<boolean> {
  if (!existsSync(`${WIREGUARD_GO_SOCKET_DIR}/${name}.sock`)) return false;
  return run('wg', ['show', name, 'listen-port'], { netns }).then(
    () => true,
    () => false,
  );
}

function kernelInterface(name: string, netns?: string): WgInterface {
  return {
    name,
    backend: 'kernel',
    async release() {},
    detach() {},
    async ensure() {
      const present = netns
        ? await run('ip', ['link', 'show', 'dev', name], { netns }).then(
            () => true,
            () => false,
          )
        : existsSync(`/sys/class/net/${name}`);
      if (present) return false;
      await run('ip', ['link', 'add', name, 'type', 'wireguard'], { netns });
      return true;
    },
    async destroy() {
      await run('ip', ['link', 'del', 'dev', name], { netns }).catch((e: unknown) => {
        if (!(e instanceof CommandError && /Cannot find device/.test(e.stderr))) throw e;
      });
    },
  };
}

const STABLE_AFTER_MS = 60_000;
const STOP_GRACE_MS = 3_000;
const KEEP_OUTPUT_LINES = 5;

class WireGuardGo implements WgInterface {
  readonly backend = 'wireguard-go';
  readonly name: string;
  private child: ChildProcess | null = null;
  private stopping = false;
  private failures = 0;
  private restartTimer: NodeJS.Timeout | null = null;
  private startedAt = 0;

  /**
   * adopted: a process started by an earlier agent. It is not our child, so
   * ensure() notices by asking its socket when it is gone.
   */
  constructor(
    private readonly options: CreateInterfaceOptions,
    private adopted = false,
  ) {
    this.name = options.name;
  }

  /** wireguard-go writes here rather than to a pipe, so it outlives an agent that restarts. */
  private get logFile(): string {
    return `${WIREGUARD_GO_SOCKET_DIR}/${this.name}.log`;
  }

  async start(): Promise<void> {
    // Now and then wireguard-go cannot create its socket ("Failed to listen on
    // uapi socket: no such file or directory") when other wireguard-go
    // processes start or stop at the same moment; a second try has always
    // worked, so a start is tried three times before the agent gives up.
    for (let attempt = 1; ; attempt++) {
      try {
        await this.startOnce();
        return;
      } catch (e) {
        if (attempt >= 3 || !(e instanceof BackendError) || !/uapi socket/.test(e.message)) throw e;
      }
    }
  }

  private async startOnce(): Promise<void> {
    mkdirSync(WIREGUARD_GO_SOCKET_DIR, { recursive: true, mode: 0o755 });
    const [file, args] = inNetns('wireguard-go', ['-f', this.name], this.options.netns);
    // Its own process group and a log file instead of pipes: a signal to the agent's group, or the
    // agent exiting to restart into a new version, does not take the interface down with it.
    const log = openSync(this.logFile, 'w', 0o600);
    let child: ChildProcess;
    try {
      // The variable only silences wireguard-go's banner that recommends the kernel module.
      child = spawn(file, args, {
        stdio: ['ignore', log, log],
        detached: true,
        env: { ...process.env, WG_PROCESS_FOREGROUND: '1' },
      });
    } finally {
      closeSync(log);
    }
    this.child = child;
    let ready = false;
    const exited = new Promise<never>((_, reject) => {
      child.on('error', (e: NodeJS.ErrnoException) =>
        reject(e.code === 'ENOENT' ? new MissingToolError('wireguard-go') : e),
      );
      child.on('close', (code, signal) => {
        if (ready) return this.onExit(code, signal);
        const missing = /exec of ".*" failed: No such file/.test(this.outputLines().join('\n'));
        reject(
          missing
            ? new MissingToolError('wireguard-go')
            : new BackendError(
                `wireguard-go for ${this.name} exited (${code ?? signal}): ${this.lastOutput()}`,
              ),
        );
      });
    });
    exited.catch(() => {});
    const polling = new AbortController();
    try {
      await Promise.race([exited, this.waitReady(polling.signal)]);
    } catch (e) {
      if (child.exitCode === null && child.signalCode === null) await this.kill(child);
      this.child = null;
      throw e;
    } finally {
      polling.abort();
    }
    ready = true;
    this.startedAt = Date.now();
  }

  /** Ready once `wg` can talk to the new process: the socket alone may be a stale one from a crash. */
  private async waitReady(signal: AbortSignal): Promise<void> {
    const deadline = Date.now() + (this.options.readyTimeoutMs ?? 5_000);
    while (!signal.aborted) {
      try {
        await run('wg', ['show', this.name, 'listen-port'], { netns: this.options.netns });
        return;
      } catch (e) {
        if (e instanceof MissingToolError) throw e;
        if (Date.now() > deadline) {
          throw new BackendError(`wireguard-go did not bring up ${this.name} in time: ${this.lastOutput()}`);
        }
      }
      await sleep(50);
    }
  }

  private outputLines(): string[] {
    try {
      return readFileSync(this.logFile, 'utf8').split('\n').filter(Boolean).slice(-KEEP_OUTPUT_LINES);
    } catch {
      return [];
    }
  }

  private lastOutput(): string {
    return this.outputLines().at(-1) ?? 'no output';
  }

  private onExit(code: number | null, signal: string | null): void {
    this.child = null;
    if (this.stopping) return;
    this.options.onEvent?.({ kind: 'exited', code, signal, output: this.lastOutput() });
    if (this.startedAt && Date.now() - this.startedAt > STABLE_AFTER_MS) this.failures = 0;
    this.scheduleRestart();
  }

  private scheduleRestart(): void {
    const initial = this.options.initialBackoffMs ?? 500;
    const delay = Math.min(this.options.maxBackoffMs ?? 30_000, initial * 2 ** this.failures);
    this.failures++;
    const attempt = this.failures;
    this.restartTimer = setTimeout(async () => {
      this.restartTimer = null;
      if (this.stopping) return;
      try {
        await this.start();
        if (this.stopping) return;
        this.options.onEvent?.({ kind: 'restarted', attempt });
        await this.options.onRestart?.();
      } catch (e) {
        this.options.onEvent?.({ kind: 'restart-failed', attempt, error: e as Error });
        // A process that came up but could not be reconfigured keeps running (the caller hears of
        // it); one that never came up is tried again.
        if (!this.child && !this.stopping) this.scheduleRestart();
      }
    }, delay);
  }

  private async kill(child: ChildProcess): Promise<void> {
    const gone = new Promise<void>((resolve) => child.once('close', () => resolve()));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS);
    await gone;
    clearTimeout(timer);
  }

  async ensure(): Promise<boolean> {
    if (!this.adopted || this.stopping || (await wireguardGoRunning(this.name, this.options.netns)))
      return false;
    // The adopted process is gone: from now on this agent supervises its own.
    this.adopted = false;
    await rm(`${WIREGUARD_GO_SOCKET_DIR}/${this.name}.sock`, { force: true });
    await this.start();
    return true;
  }

  async destroy(): Promise<void> {
    this.stopping = true;
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.restartTimer = null;
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) {
      await this.kill(this.child);
    } else if (this.adopted) {
      // Not our child to signal: wireguard-go exits when its interface goes.
      await run('ip', ['link', 'del', 'dev', this.name], { netns: this.options.netns }).catch(() => {});
    }
    // wireguard-go removes its socket on a clean exit only.
    await rm(`${WIREGUARD_GO_SOCKET_DIR}/${this.name}.sock`, { force: true });
    await rm(this.logFile, { force: true });
  }

  release(): Promise<void> {
    return this.destroy();
  }

  detach(): void {
    this.stopping = true;
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.restartTimer = null;
    this.child?.removeAllListeners();
    this.child?.unref();
    this.child = null;
  }
}
