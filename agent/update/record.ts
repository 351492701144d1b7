// STATE_DIR/update.json: an update in flight, shared by the agent that
// started it, the watchdog that may roll it back, and the agent that runs
// afterwards (the new release, or the old one again).
import { chmodSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { isSemVer } from '../../release/semver.js';

const semver = z.string().refine(isSemVer);

const RecordSchema = z.object({
  from: semver,
  to: semver,
  /**
   * restarting: current points at `to`, the new agent has to reach the coordinator by `deadline`;
   * confirmed: it did; failed: `to` was refused or rolled back (reason says why), do not try it again
   * while the coordinator keeps naming it.
   */
  phase: z.enum(['restarting', 'confirmed', 'failed']),
  reason: z.string().max(512),
  deadline: z.number(),
  /** How long the new release had, for messages. */
  timeoutMs: z.number().int().positive(),
  /** When the coordinator's entry for `to` was set: a failed version is tried again only when set anew. */
  setAt: z.number().default(0),
  /** The agent that runs `to`, once it started. */
  pid: z.number().int().positive().optional(),
});

export type UpdateRecord = z.infer<typeof RecordSchema>;

export const recordPath = (stateDir: string) => join(stateDir, 'update.json');

/** The record, or null when there is none or it cannot be read (then it is ignored, not trusted). */
export function readRecord(stateDir: string): UpdateRecord | null {
  try {
    const r = RecordSchema.safeParse(JSON.parse(readFileSync(recordPath(stateDir), 'utf8')));
    return r.success ? r.data : null;
  } catch {
    return null;
  }
}

export function writeRecord(stateDir: string, r: UpdateRecord): void {
  const file = recordPath(stateDir);
  const tmp = `${file}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(r)}\n`, { mode: 0o600 });
  chmodSync(tmp, 0o600);
  renameSync(tmp, file);
}

export function clearRecord(stateDir: string): void {
  rmSync(recordPath(stateDir), { force: true });
}
