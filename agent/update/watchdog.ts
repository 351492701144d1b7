// The watchdog of one update: a detached process running the release the
// agent updated from (known to work), started just before the agent exits
// to restart into the new one. If the new release has not reached the
// coordinator by the deadline (it does not start, crashes, or cannot
// connect), `current` goes back to the old release and the agent is
// restarted into it, which then reports the failure to the coordinator.
import { setTimeout as sleep } from 'node:timers/promises';
import { processAlive } from '../pid.js';
import { switchCurrent } from './install.js';
import { readRecord, type UpdateRecord, writeRecord } from './record.js';

export interface WatchdogOptions {
  stateDir: string;
  prefix: string;
  /** The version being watched; a record for another one means a newer update took over. */
  to: string;
  pollMs?: number;
  /** How long the new agent has to exit after it was told to, before it is killed. */
  stopGraceMs?: number;
}

export type WatchdogOutcome = 'confirmed' | 'rolled-back' | 'superseded';

export async function watchUpdate(o: WatchdogOptions): Promise<WatchdogOutcome> {
  for (;;) {
    const r = readRecord(o.stateDir);
    if (!r || r.to !== o.to || r.phase === 'failed') return 'superseded';
    if (r.phase === 'confirmed') return 'confirmed';
    if (Date.now() >= r.deadline) {
      await rollBack(o, r);
      return 'rolled-back';
    }
    await sleep(o.pollMs ?? 500);
  }
}

/** Switches back, records why, and makes the new agent exit so its supervisor starts the old one. */
export async function rollBack(o: WatchdogOptions, r: UpdateRecord): Promise<void> {
  const within = `${Math.round(r.timeoutMs / 1000)}s`;
  const reason = r.pid
    ? `meshgate ${r.to} did not reach the coordinator within ${within}; rolled back to ${r.from}`
    : `meshgate ${r.to} did not start as the agent within ${within}; rolled back to ${r.from}`;
  switchCurrent(o.prefix, r.from);
  writeRecord(o.stateDir, { ...r, phase: 'failed', reason });
  if (!r.pid || !processAlive(r.pid)) return;
  // SIGUSR2: restart keeping the mesh (the agent exits like for an update).
  process.kill(r.pid, 'SIGUSR2');
  const until = Date.now() + (o.stopGraceMs ?? 10_000);
  while (processAlive(r.pid) && Date.now() < until) await sleep(100);
  if (processAlive(r.pid)) process.kill(r.pid, 'SIGKILL');
}
