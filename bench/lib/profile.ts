// Summarizes a V8 .cpuprofile (node --cpu-prof): self time per function and
// per package or source file, idle time left out.
import { readFileSync } from 'node:fs';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface Row {
  name: string;
  ms: number;
  /** % of the busy (non-idle) time. */
  pct: number;
}

export interface ProfileSummary {
  busyMs: number;
  idleMs: number;
  functions: Row[];
  areas: Row[];
}

/** Where a function lives: an npm package, a meshgate source file, node internals, or a V8 pseudo-node. */
function area(url: string, name: string): string {
  if (!url) return name.startsWith('(') ? name : '(native)';
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  if (pkg) return pkg[1]!;
  if (url.startsWith('node:')) return 'node:internal';
  const own = /\/dist\/(.+)\.js$/.exec(url) ?? /\/((?:coordinator|proto|cli|agent)\/.+)\.[jt]s$/.exec(url);
  return own ? own[1]! : url;
}

function where(url: string, line: number): string {
  const short = url.replace(/^.*node_modules\//, '').replace(/^.*\/dist\//, '');
  return short ? `${short}:${line + 1}` : '';
}

/** `lastMs`: only the samples of the profile's last `lastMs` milliseconds (e.g. a shutdown). */
export function summarizeProfile(file: string, top = 15, lastMs = Number.POSITIVE_INFINITY): ProfileSummary {
  const p = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<number, number>();
  const from = p.endTime - lastMs * 1000;
  let at = p.startTime;
  // timeDeltas[i + 1] is the time until the sample after i: the time spent where sample i was taken.
  for (let i = 0; i < p.samples.length; i++) {
    at += p.timeDeltas[i] ?? 0;
    if (at < from) continue;
    const dt = p.timeDeltas[i + 1] ?? 0;
    self.set(p.samples[i]!, (self.get(p.samples[i]!) ?? 0) + dt / 1000);
  }
  const fns = new Map<string, number>();
  const areas = new Map<string, number>();
  let idle = 0;
  let busy = 0;
  for (const [id, ms] of self) {
    const { functionName, url, lineNumber } = byId.get(id)!.callFrame;
    if (functionName === '(idle)') {
      idle += ms;
      continue;
    }
    busy += ms;
    const key = `${functionName || '(anonymous)'} ${where(url, lineNumber)}`.trim();
    fns.set(key, (fns.get(key) ?? 0) + ms);
    const a = area(url, functionName);
    areas.set(a, (areas.get(a) ?? 0) + ms);
  }
  const rows = (m: Map<string, number>) =>
    [...m]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([name, ms]) => ({ name, ms: Math.round(ms), pct: Math.round((ms / busy) * 1000) / 10 }));
  return { busyMs: Math.round(busy), idleMs: Math.round(idle), functions: rows(fns), areas: rows(areas) };
}

export function formatProfile(s: ProfileSummary): string {
  const table = (title: string, rows: Row[]) => [
    title,
    ...rows.map((r) => `  ${String(r.pct).padStart(5)}%  ${String(r.ms).padStart(7)} ms  ${r.name}`),
  ];
  return [
    `busy ${s.busyMs} ms, idle ${s.idleMs} ms`,
    ...table('self time by function:', s.functions),
    ...table('self time by package / file:', s.areas),
  ].join('\n');
}
