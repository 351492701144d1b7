// The audit log: who changed what, and when, written in the same
// transaction as the change itself, and read back by admins.
import type { Kysely, Transaction } from 'kysely';
import type { Database } from '../store/schema.js';

/** Actions whose target is the project itself; the others name it in their detail. */
const PROJECT_TARGETS = ['project.', 'policy.', 'version.'];

export async function audit(
  tx: Transaction<Database>,
  at: number,
  actor: string,
  action: string,
  target: string,
  detail: object = {},
): Promise<void> {
  // The project is kept in a column of its own so that a scoped API key can
  // be shown its projects' entries without parsing every detail.
  const named = (detail as { project?: unknown }).project;
  const project =
    typeof named === 'string' ? named : PROJECT_TARGETS.some((p) => action.startsWith(p)) ? target : null;
  await tx
    .insertInto('audit_log')
    .values({ at, actor, action, target, project, detail: JSON.stringify(detail) })
    .execute();
}

export interface AuditEntry {
  id: number;
  at: number;
  actor: string;
  action: string;
  target: string;
  project: string | null;
  detail: string;
}

export interface AuditQuery {
  /** Only entries of these projects; null for all entries, including those of no project. */
  projects: readonly string[] | null;
  /** Only entries at or after this time. */
  since: number | null;
  /** The newest this many. */
  limit: number;
}

/** The newest `limit` entries that match, oldest first. */
export async function readAudit(db: Kysely<Database>, q: AuditQuery): Promise<AuditEntry[]> {
  if (q.projects?.length === 0) return [];
  let query = db.selectFrom('audit_log').selectAll();
  if (q.projects) query = query.where('project', 'in', q.projects);
  if (q.since !== null) query = query.where('at', '>=', q.since);
  const rows = await query.orderBy('id', 'desc').limit(q.limit).execute();
  return rows.reverse().map((r) => ({
    id: Number(r.id),
    at: Number(r.at),
    actor: r.actor,
    action: r.action,
    target: r.target,
    project: r.project,
    detail: r.detail,
  }));
}
