// Token buckets per source address: registration attempts, failed authentications.
// They refill by a monotonic clock, and time that runs backwards refills
// nothing: with the wall clock, a step back (NTP, a resumed VM) emptied every
// bucket for as long as the step.
export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(
    private readonly perSecond: number,
    private readonly burst: number,
    private readonly now: () => number = () => performance.now(),
  ) {}

  take(key: string): boolean {
    const now = this.now();
    const b = this.buckets.get(key) ?? { tokens: this.burst, at: now };
    b.tokens = this.tokens(b, now);
    b.at = now;
    const ok = b.tokens >= 1;
    if (ok) b.tokens -= 1;
    this.buckets.set(key, b);
    if (this.buckets.size > 100_000) this.prune(now);
    return ok;
  }

  /** Whether `take` would succeed now; takes nothing. */
  available(key: string): boolean {
    const b = this.buckets.get(key);
    return !b || this.tokens(b, this.now()) >= 1;
  }

  private tokens(b: { tokens: number; at: number }, now: number): number {
    return Math.min(this.burst, b.tokens + (Math.max(0, now - b.at) / 1000) * this.perSecond);
  }

  private prune(now: number): void {
    for (const [k, b] of this.buckets) if (this.tokens(b, now) >= this.burst) this.buckets.delete(k);
  }
}
