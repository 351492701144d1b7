// Numbers that are never reused: Headscale's API addresses projects ("users")
// and nodes by them.
import type { Kysely, Transaction } from 'kysely';
import type { Database } from '../store/schema.js';

export type Counter = 'projects' | 'nodes';

export class Counters {
  private readonly last: Record<Counter, number> = { projects: 0, nodes: 0 };

  async load(db: Kysely<Database>): Promise<void> {
    for (const c of await db.selectFrom('id_counters').selectAll().execute()) {
      this.last[c.name as Counter] = Number(c.last);
    }
  }

  /** Reserves the next number of a counter in memory; `save` makes it durable. */
  next(counter: Counter): number {
    this.last[counter] += 1;
    return this.last[counter];
  }

  /** Inside the transaction that uses `n`: the stored counter never goes back. */
  async save(tx: Transaction<Database>, counter: Counter, n: number): Promise<void> {
    await tx
      .updateTable('id_counters')
      .set({ last: n })
      .where('name', '=', counter)
      .where('last', '<', n)
      .execute();
  }
}
