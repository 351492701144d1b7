// Numbers that are never reused: Headscale's API addresses projects ("users")
// and nodes by them.
import type { Kysely, Transaction } from 'kysely';
import type { Database } from '../store/schema.js';

/** `addresses` is only counted in the database, by coordinators sharing it (see AddressPool.reserveFrom). */
export type Counter = 'projects' | 'nodes' | 'addresses';

export class Counters {
  private readonly last: Record<Counter, number> = { projects: 0, nodes: 0, addresses: 0 };

  /**
   * `shared`: other coordinators take numbers from the same database, so each
   * is taken there; otherwise this process is the only one and counts in memory.
   */
  constructor(
    private readonly db: Kysely<Database>,
    readonly shared: boolean,
  ) {}

  async load(): Promise<void> {
    for (const c of await this.db.selectFrom('id_counters').selectAll().execute()) {
      this.last[c.name as Counter] = Number(c.last);
    }
  }

  /** Reserves the next number of a counter; `save` makes it durable when it is only reserved in memory. */
  async next(counter: Counter): Promise<number> {
    if (this.shared) {
      // Its own short statement, outside the caller's transaction: the row lock
      // is released at once, and a number lost to a failed write is a gap, never a repeat.
      const r = await this.db
        .updateTable('id_counters')
        .set((eb) => ({ last: eb('last', '+', 1) }))
        .where('name', '=', counter)
        .returning('last')
        .executeTakeFirstOrThrow();
      return Number(r.last);
    }
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
