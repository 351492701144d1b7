// What other coordinators on the same database must re-read. Every mutation
// records one entry per changed thing inside its own transaction, so the
// entry commits exactly when the change does. On SQLite one process owns the
// database and nothing is recorded.
import { type Kysely, sql, type Transaction } from 'kysely';
import type { Database } from '../store/schema.js';

export type ChangeKind = 'node' | 'project' | 'policy' | 'global-policy' | 'versions' | 'presence';

export interface Change {
  kind: ChangeKind;
  /** Node id, project name, or '' for the global policy. */
  ref: string;
}

export interface LoggedChange extends Change {
  seq: number;
  origin: string;
}

export const CHANGES_CHANNEL = 'meshgate_changes';
/** Held until commit by every transaction that records a change: sequence numbers then commit in order. */
const CHANGES_LOCK = 0x6d657368;

export interface ChangeLog {
  /** Inside the transaction of the change. */
  record(tx: Transaction<Database>, ...changes: Change[]): Promise<void>;
}

export const unshared: ChangeLog = { record: async () => {} };

export class SharedChangeLog implements ChangeLog {
  constructor(
    readonly origin: string,
    private readonly now: () => number,
  ) {}

  async record(tx: Transaction<Database>, ...changes: Change[]): Promise<void> {
    if (changes.length === 0) return;
    // Without the lock a later sequence number could commit first, and a
    // reader that moved past it would never see the earlier one.
    await sql`select pg_advisory_xact_lock(${CHANGES_LOCK})`.execute(tx);
    const at = this.now();
    const rows = await tx
      .insertInto('changes')
      .values(changes.map((c) => ({ at, origin: this.origin, kind: c.kind, ref: c.ref })))
      .returning('seq')
      .execute();
    for (const [i, c] of changes.entries()) {
      const payload: LoggedChange = { seq: Number(rows[i]!.seq), origin: this.origin, ...c };
      // Delivered on commit, in commit order; nothing if the transaction rolls back.
      await sql`select pg_notify(${CHANGES_CHANNEL}, ${JSON.stringify(payload)})`.execute(tx);
    }
  }
}

/** Entries after `seq`, oldest first. */
export async function readChanges(
  db: Kysely<Database>,
  after: number,
  limit = 1000,
): Promise<LoggedChange[]> {
  const rows = await db
    .selectFrom('changes')
    .select(['seq', 'origin', 'kind', 'ref'])
    .where('seq', '>', after)
    .orderBy('seq')
    .limit(limit)
    .execute();
  return rows.map((r) => ({ seq: Number(r.seq), origin: r.origin, kind: r.kind as ChangeKind, ref: r.ref }));
}

/** The newest entry's number, or 0; and the oldest one kept (older were pruned). */
export async function changeBounds(db: Kysely<Database>): Promise<{ first: number; last: number }> {
  const r = await db
    .selectFrom('changes')
    .select((eb) => [eb.fn.min('seq').as('first'), eb.fn.max('seq').as('last')])
    .executeTakeFirst();
  return { first: Number(r?.first ?? 0), last: Number(r?.last ?? 0) };
}

/** Drops entries older than `before`; every coordinator has read them long ago or reloads everything. */
export async function pruneChanges(db: Kysely<Database>, before: number): Promise<void> {
  await db.deleteFrom('changes').where('at', '<', before).execute();
}
