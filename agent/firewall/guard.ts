// Keeps the agent's nftables table in the kernel as the agent last wrote it. Anyone may flush the
// ruleset (Debian's nftables.conf starts with `flush ruleset`, firewall controllers reload theirs),
// and a lockdown that silently vanishes reopens public SSH. `nft monitor` reports every change to
// the ruleset as it happens; a change that touches our table makes the guard compare the kernel's
// table with what it wrote and write it again when they differ. A slow periodic check covers a
// monitor that died or missed something.
import { type ChildProcess, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { CommandError, inNetns, run } from '../dataplane/exec.js';
import { type FirewallSpec, renderFirewall, renderRemoval } from './render.js';

export interface GuardOptions {
  netns?: string;
  /** Called after the guard wrote the table again because it was missing or changed. */
  onRestore?: (what: 'missing' | 'changed') => void;
  onError?: (err: Error) => void;
  /** Check this often even without a monitor event. */
  checkEveryMs?: number;
}

export type KernelState = 'absent' | 'as-applied' | 'missing' | 'changed';

const TABLE = ['inet', 'meshgate'];
const MONITOR_RESTART_MS = 1_000;

export class FirewallGuard {
  private desired: FirewallSpec | null = null;
  private expected = '';
  private queue: Promise<unknown> = Promise.resolve();
  private monitor: ChildProcess | null = null;
  private timer: NodeJS.Timeout | null = null;
  private restartTimer: NodeJS.Timeout | null = null;
  private checkPending = false;
  private stopped = true;
  restores = 0;
  lastRestore: Date | null = null;

  constructor(private readonly opts: GuardOptions = {}) {}

  /** The spec the guard keeps in the kernel, or null when the table is meant to be absent. */
  get spec(): FirewallSpec | null {
    return this.desired;
  }

  /** Replaces the table with one built from `spec` and guards it from now on. */
  apply(spec: FirewallSpec): Promise<void> {
    return this.serial(async () => {
      await this.write(spec);
      this.desired = spec;
    });
  }

  /** Removes the table and stops guarding it. */
  remove(): Promise<void> {
    return this.serial(async () => {
      this.desired = null;
      this.expected = '';
      await run('nft', ['-f', '-'], { input: renderRemoval(), netns: this.opts.netns });
    });
  }

  /** What the kernel holds compared with what the agent wrote. */
  async inspect(): Promise<KernelState> {
    const now = await this.list();
    if (!this.desired) return 'absent';
    if (now === null) return 'missing';
    return now === this.expected ? 'as-applied' : 'changed';
  }

  /** Compares the kernel with the last write and restores the table when it differs. */
  check(): Promise<void> {
    if (this.checkPending) return this.queue.then(() => {});
    this.checkPending = true;
    return this.serial(async () => {
      this.checkPending = false;
      if (!this.desired) return;
      const now = await this.list();
      if (now === this.expected) return;
      await this.write(this.desired);
      this.restores++;
      this.lastRestore = new Date();
      this.opts.onRestore?.(now === null ? 'missing' : 'changed');
    });
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.startMonitor();
    this.timer = setInterval(() => this.checkQuietly(), this.opts.checkEveryMs ?? 10_000);
    this.timer.unref();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.timer = this.restartTimer = null;
    this.monitor?.kill();
    this.monitor = null;
  }

  private checkQuietly(): void {
    this.check().catch((err: Error) => this.opts.onError?.(err));
  }

  private startMonitor(): void {
    const [file, args] = inNetns('nft', ['monitor'], this.opts.netns);
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'ignore'] });
    this.monitor = child;
    let touched = false;
    createInterface({ input: child.stdout }).on('line', (line) => {
      // Events of one transaction come first, then one "# new generation" line ends it.
      if (/\binet meshgate\b/.test(line)) touched = true;
      else if (line.startsWith('# new generation') && touched) {
        touched = false;
        this.checkQuietly();
      }
    });
    child.on('error', (err) => this.opts.onError?.(err));
    child.on('close', () => {
      if (this.monitor === child) this.monitor = null;
      if (this.stopped) return;
      // Whatever happened while it was gone, the next check sees.
      this.checkQuietly();
      this.restartTimer = setTimeout(() => {
        this.restartTimer = null;
        if (!this.stopped) this.startMonitor();
      }, MONITOR_RESTART_MS);
      this.restartTimer.unref();
    });
  }

  private async write(spec: FirewallSpec): Promise<void> {
    await run('nft', ['-f', '-'], { input: renderFirewall(spec), netns: this.opts.netns });
    this.expected = (await this.list()) ?? '';
  }

  /** The table as `nft list` prints it (no handles), or null when there is none. */
  private async list(): Promise<string | null> {
    try {
      return await run('nft', ['list', 'table', ...TABLE], { netns: this.opts.netns });
    } catch (err) {
      if (err instanceof CommandError && /No such file or directory/.test(err.stderr)) return null;
      throw err;
    }
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.catch(() => {}).then(fn);
    this.queue = next;
    return next;
  }
}
