// The audit log: who changed what, and when, written in the same
// transaction as the change itself.
import type { Transaction } from 'kysely';
import type { Database } from '../store/schema.js';

export async function audit(
  tx: Transaction<Database>,
  at: number,
  actor: string,
  action: string,
  target: string,
  detail: object = {},
): Promise<void> {
  await tx
    .insertInto('audit_log')
    .values({ at, actor, action, target, detail: JSON.stringify(detail) })
    .execute();
}
