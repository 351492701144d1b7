// Small statistics helpers for benchmark samples (milliseconds unless named otherwise).

export interface Summary {
  n: number;
  p50: number;
  p95: number;
  p99: number;
  max: number;
  mean: number;
}

/** Nearest-rank percentile of an ascending array. */
export function percentile(sorted: readonly number[], p: number): number {
  if (!sorted.length) return Number.NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]!;
}

export function summarize(samples: readonly number[]): Summary {
  const s = [...samples].sort((a, b) => a - b);
  const mean = s.reduce((a, b) => a + b, 0) / (s.length || 1);
  return {
    n: s.length,
    p50: round(percentile(s, 50)),
    p95: round(percentile(s, 95)),
    p99: round(percentile(s, 99)),
    max: round(s[s.length - 1] ?? Number.NaN),
    mean: round(mean),
  };
}

export function round(x: number, digits = 1): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** Monotonic milliseconds, comparable between processes on one Linux host (CLOCK_MONOTONIC). */
export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** CPU time of this process over a stretch of wall time, as % of one core. */
export class CpuMeter {
  private cpu = process.cpuUsage();
  private at = nowMs();

  /** % of one core since construction or the last call. */
  lap(): number {
    const cpu = process.cpuUsage(this.cpu);
    const at = nowMs();
    const pct = ((cpu.user + cpu.system) / 1000 / (at - this.at)) * 100;
    this.cpu = process.cpuUsage();
    this.at = at;
    return round(pct);
  }
}
