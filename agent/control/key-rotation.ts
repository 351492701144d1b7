// Scheduled rotation of the node's WireGuard key.
//
// The order of one rotation is chosen so that a crash at any point cannot
// lock the node out of its mesh:
//   1. make a new key pair, in memory only;
//   2. ask the coordinator to take the new public key (RotateNodeKey);
//   3. only once it has: replace node.key atomically (write + rename);
//   4. switch the interface to the new private key.
// A crash before 3 leaves node.key holding the old key. The agent registers
// again on every start and reconnect with the key in node.key, and the
// coordinator adopts the key a registering machine presents, so after a
// restart coordinator, file and interface agree on the old key again (and,
// the key still being old, the rotation is simply tried again). A crash after
// 3 restarts with the new key, which the coordinator already holds. Should a
// reconnect's registration race a rotation and leave the coordinator with
// the other key, the agent sees it in its next netmap and sends its key again.
import { parseDuration } from '../../proto/duration.js';

export const DEFAULT_NODE_KEY_LIFETIME_MS = 24 * 3_600_000;

/** Up to this share of the lifetime is taken off at random, so a fleet started together spreads out. */
const JITTER = 0.1;
/** setTimeout's longest delay; a longer wait is split and checked again. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export class KeyLifetimeError extends Error {
  override name = 'KeyLifetimeError';
}

/** "24h", "3s", … ; "0" or "off" turns rotation off (0). */
export function parseKeyLifetime(text: string): number {
  const t = text.trim().toLowerCase();
  if (t === 'off' || t === '0') return 0;
  try {
    const ms = parseDuration(t);
    if (ms < 1000) throw new RangeError(`node key lifetime ${text} is shorter than 1s`);
    return ms;
  } catch (err) {
    throw new KeyLifetimeError(`${(err as Error).message}, or "off" to never rotate`);
  }
}

/** Milliseconds until a key made at `createdAtMs` is due, with jitter (random in [0,1)). */
export function rotationDelay(
  createdAtMs: number,
  lifetimeMs: number,
  nowMs: number,
  random: number,
): number {
  const due = createdAtMs + lifetimeMs * (1 - JITTER * random);
  return Math.max(0, Math.round(due - nowMs));
}

/** After a failed attempt: a quarter of the lifetime, between 1 s and 5 min. */
export function retryDelay(lifetimeMs: number): number {
  return Math.min(300_000, Math.max(1000, Math.round(lifetimeMs / 4)));
}

export interface KeyPair {
  secret: Uint8Array;
  public: Uint8Array;
}

/** The steps of one rotation, in the order described at the top of this file. */
export interface RotationSteps {
  generate(): KeyPair;
  /** RotateNodeKey; throws when the coordinator does not take the key. */
  accept(publicKey: Uint8Array): Promise<void>;
  /** Replaces node.key atomically. */
  save(secret: Uint8Array): void;
  /** Puts the new private key on the interface and in what the agent registers with. */
  use(pair: KeyPair): Promise<void>;
}

export async function rotateOnce(steps: RotationSteps): Promise<KeyPair> {
  const pair = steps.generate();
  await steps.accept(pair.public);
  steps.save(pair.secret);
  await steps.use(pair);
  return pair;
}

export interface RotatorOptions {
  lifetimeMs: number;
  /** When the current node.key was made (ms since the epoch). */
  createdAt(): number;
  /** False while the coordinator cannot be reached: the rotation waits. */
  ready(): boolean;
  steps: RotationSteps;
  onRotated(pair: KeyPair): void;
  onFailed(err: Error): void;
  now?: () => number;
  random?: () => number;
}

/** Runs rotateOnce whenever the key is older than its (jittered) lifetime. */
export class NodeKeyRotator {
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<void> | null = null;
  private stopped = false;

  constructor(private readonly opts: RotatorOptions) {}

  get rotating(): boolean {
    return this.running !== null;
  }

  start(): void {
    if (this.opts.lifetimeMs <= 0) return;
    this.schedule();
  }

  /** Rotates at once, whatever the key's age (unless a rotation is under way or rotation is off). */
  rotateNow(): void {
    if (this.stopped || this.running || this.opts.lifetimeMs <= 0) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    void this.fire();
  }

  stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    return this.running ?? Promise.resolve();
  }

  private schedule(delay?: number): void {
    if (this.stopped) return;
    const now = (this.opts.now ?? Date.now)();
    const wait =
      delay ??
      rotationDelay(this.opts.createdAt(), this.opts.lifetimeMs, now, (this.opts.random ?? Math.random)());
    if (wait > MAX_TIMER_MS) {
      this.timer = setTimeout(() => this.schedule(), MAX_TIMER_MS);
    } else this.timer = setTimeout(() => void this.fire(), wait);
    this.timer.unref?.();
  }

  private async fire(): Promise<void> {
    this.timer = null;
    if (this.stopped) return;
    if (!this.opts.ready()) {
      this.schedule(retryDelay(this.opts.lifetimeMs));
      return;
    }
    let failed = false;
    this.running = rotateOnce(this.opts.steps).then(
      (pair) => this.opts.onRotated(pair),
      (err: Error) => {
        failed = true;
        this.opts.onFailed(err);
      },
    );
    await this.running;
    this.running = null;
    this.schedule(failed ? retryDelay(this.opts.lifetimeMs) : undefined);
  }
}
