// The Kysely driver for the coordinator's SQLite file, in place of Kysely's
// own, for two costs that dominated registering many agents at once:
//  - Group commit. Waiting for the disk at every COMMIT (about 2 ms here)
//    on the event loop's thread, as better-sqlite3 does with
//    synchronous=FULL, capped registrations at a few hundred per second
//    whatever the CPU. Transactions that meet here within one turn of the
//    event loop now run one after another inside one SQLite transaction,
//    each in a savepoint of its own (its failure undoes only its changes),
//    and share one COMMIT. With a `log` (db.ts: synchronous=NORMAL and an
//    fdatasync of the write-ahead log in the thread pool), the COMMIT does
//    not wait for the disk and the loop goes on; none of the group returns
//    before the sync that followed its COMMIT, so an acknowledged change
//    still survives a power loss. If the COMMIT or that sync fails, every
//    one of them fails; after a failed sync no change is taken any more
//    (see `fenced`).
//  - Statements are prepared once per SQL text and kept, instead of once per
//    execution.
import type SQLite from 'better-sqlite3-multiple-ciphers';
import {
  type CompiledQuery,
  type DatabaseConnection,
  type DatabaseIntrospector,
  type Dialect,
  type DialectAdapter,
  type Driver,
  type Kysely,
  type QueryCompiler,
  type QueryResult,
  SqliteAdapter,
  SqliteIntrospector,
  SqliteQueryCompiler,
} from 'kysely';
import type { LogSync } from './file-sync.js';
import { StoreUnavailableError, storeUnavailable } from './unavailable.js';

/** Transactions that share one COMMIT at most; more wait for the next one. */
export const GROUP_LIMIT = 64;
/** Prepared statements kept; the coordinator issues far fewer distinct ones. */
const STATEMENT_CACHE = 500;
const SAVEPOINT = 'meshgate_tx';

export interface DriverOptions {
  /**
   * Makes every commit made before `sync()` durable; without it a COMMIT is
   * taken as durable when it returns (synchronous=FULL, or a database in
   * memory).
   */
  log?: LogSync;
  /** Told once, when a sync of the log fails and the driver stops taking changes. */
  onLogFailure?: (err: Error) => void;
}

export function sqliteDialect(db: SQLite.Database, opts: DriverOptions = {}): Dialect {
  return {
    createAdapter: (): DialectAdapter => new SqliteAdapter(),
    createDriver: (): Driver => new GroupCommitDriver(db, opts.log, opts.onLogFailure),
    createIntrospector: (k: Kysely<unknown>): DatabaseIntrospector => new SqliteIntrospector(k),
    createQueryCompiler: (): QueryCompiler => new SqliteQueryCompiler(),
  };
}

/** One caller's turn on the single SQLite connection. */
class Lease implements DatabaseConnection {
  /** Inside its savepoint. */
  inTransaction = false;
  /** Gave the connection up after its transaction; taken again if the lease is used once more. */
  handedOff = false;

  constructor(private readonly driver: GroupCommitDriver) {}

  async executeQuery<R>(query: CompiledQuery): Promise<QueryResult<R>> {
    await this.driver.beforeStatement(this);
    const stmt = this.driver.prepare(query.sql);
    if (!stmt.readonly) this.driver.changing();
    const result = this.driver.run<R>(stmt, query.parameters);
    // A change outside a transaction committed on its own: it is acknowledged
    // once on disk, and others may use the connection meanwhile.
    if (!this.inTransaction && !stmt.readonly) await this.driver.durable(this);
    return result;
  }

  async *streamQuery<R>(query: CompiledQuery): AsyncIterableIterator<QueryResult<R>> {
    await this.driver.beforeStatement(this);
    // Not from the cache: an iterating statement cannot run again until it is done.
    for (const row of this.driver.prepare(query.sql, false).iterate(query.parameters))
      yield { rows: [row as R] };
  }
}

interface Member {
  resolve(): void;
  reject(err: unknown): void;
}

export class GroupCommitDriver implements Driver {
  private readonly statements = new Map<string, SQLite.Statement>();
  private locked = false;
  private readonly waiting: (() => void)[] = [];
  /** An outer BEGIN is open; these transactions finished inside it and wait for its COMMIT. */
  private groupOpen = false;
  private members: Member[] = [];
  /** A statement of the open group may have changed something: its COMMIT needs a sync. */
  private groupChanged = false;
  private commitScheduled = false;
  /**
   * Why changes are refused: a sync of the log failed. The kernel may then
   * have dropped the pages it could not write and report the next sync as
   * done, so nothing acknowledged afterwards could be trusted to be on
   * disk. Reads go on; a restart finds the last commit that SQLite can
   * check in its log.
   */
  private fenced: StoreUnavailableError | null = null;

  constructor(
    private readonly db: SQLite.Database,
    private readonly log?: LogSync,
    private readonly onLogFailure?: (err: Error) => void,
  ) {}

  async init(): Promise<void> {}

  prepare(sql: string, cache = true): SQLite.Statement {
    let stmt = cache ? this.statements.get(sql) : undefined;
    if (!stmt) {
      stmt = this.db.prepare(sql);
      if (cache) {
        if (this.statements.size >= STATEMENT_CACHE)
          this.statements.delete(this.statements.keys().next().value!);
        this.statements.set(sql, stmt);
      }
    }
    return stmt;
  }

  run<R>(stmt: SQLite.Statement, parameters: readonly unknown[]): QueryResult<R> {
    const params = parameters as unknown[];
    if (stmt.reader) return { rows: stmt.all(params) as R[] };
    const { changes, lastInsertRowid } = stmt.run(params);
    return {
      numAffectedRows: BigInt(changes),
      insertId: lastInsertRowid === undefined ? undefined : BigInt(lastInsertRowid),
      rows: [],
    };
  }

  private lock(): Promise<void> {
    if (!this.locked) {
      this.locked = true;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  private unlock(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.locked = false;
  }

  /**
   * A lease that gave the connection up takes it again; a statement outside
   * a transaction first commits the open group, so that it is not acknowledged
   * before it is on disk either.
   */
  async beforeStatement(lease: Lease): Promise<void> {
    if (lease.handedOff) {
      await this.lock();
      lease.handedOff = false;
    }
    if (!lease.inTransaction && this.groupOpen) this.commitGroup();
  }

  /** Hands the lease's connection on and waits until its change is on disk. */
  async durable(lease: Lease): Promise<void> {
    if (!this.log) return;
    lease.handedOff = true;
    this.unlock();
    await this.syncLog(this.log);
  }

  /** A statement that may change something is about to run. */
  changing(): void {
    if (this.fenced) throw this.fenced;
    if (this.groupOpen) this.groupChanged = true;
  }

  /** Syncs the log; a sync that ends after another failed is not trusted either. */
  private syncLog(log: LogSync): Promise<void> {
    return log.sync().then(
      () => {
        if (this.fenced) throw this.fenced;
      },
      (err: unknown) => {
        if (!this.fenced) {
          const why = err instanceof Error ? err.message : String(err);
          this.fenced = new StoreUnavailableError(
            `the coordinator takes no changes since a sync of its database to disk failed (${why}); restart it once the disk is checked`,
          );
          this.onLogFailure?.(err instanceof Error ? err : new Error(why));
        }
        throw err;
      },
    );
  }

  async acquireConnection(): Promise<DatabaseConnection> {
    await this.lock();
    return new Lease(this);
  }

  async beginTransaction(c: DatabaseConnection): Promise<void> {
    const lease = leaseOf(c);
    if (lease.handedOff) {
      await this.lock();
      lease.handedOff = false;
    }
    if (!this.groupOpen) {
      this.db.exec('begin');
      this.groupOpen = true;
    }
    this.db.exec(`savepoint ${SAVEPOINT}`);
    lease.inTransaction = true;
  }

  async commitTransaction(c: DatabaseConnection): Promise<void> {
    const lease = leaseOf(c);
    this.db.exec(`release ${SAVEPOINT}`);
    lease.inTransaction = false;
    const committed = new Promise<void>((resolve, reject) => this.members.push({ resolve, reject }));
    if (this.members.length >= GROUP_LIMIT) {
      this.commitGroup();
    } else {
      // Let the transactions already waiting, and those that start in this
      // turn of the event loop, join before the COMMIT.
      lease.handedOff = true;
      this.scheduleCommit();
      this.unlock();
    }
    await committed;
  }

  async rollbackTransaction(c: DatabaseConnection): Promise<void> {
    const lease = leaseOf(c);
    // Not inside its savepoint any more: the shared COMMIT failed and rolled everything back.
    if (!lease.inTransaction) return;
    lease.inTransaction = false;
    this.db.exec(`rollback to ${SAVEPOINT}`);
    this.db.exec(`release ${SAVEPOINT}`);
    this.scheduleCommit();
  }

  private scheduleCommit(): void {
    if (this.commitScheduled) return;
    this.commitScheduled = true;
    setImmediate(() => {
      void this.lock().then(() => {
        this.commitScheduled = false;
        if (this.groupOpen) this.commitGroup();
        this.unlock();
      });
    });
  }

  /** COMMIT (the caller holds the connection) and settle every transaction of the group. */
  private commitGroup(): void {
    const members = this.members;
    const changed = this.groupChanged;
    this.members = [];
    this.groupOpen = false;
    this.groupChanged = false;
    try {
      this.db.exec('commit');
    } catch (err) {
      if (this.db.inTransaction) this.db.exec('rollback');
      const failure = storeUnavailable(err) ?? err;
      for (const m of members) m.reject(failure);
      return;
    }
    if (!this.log || !changed) {
      for (const m of members) m.resolve();
      return;
    }
    this.syncLog(this.log).then(
      () => {
        for (const m of members) m.resolve();
      },
      (err: unknown) => {
        for (const m of members) m.reject(err);
      },
    );
  }

  async releaseConnection(c: DatabaseConnection): Promise<void> {
    const lease = leaseOf(c);
    if (lease.handedOff) return;
    lease.handedOff = true;
    this.unlock();
  }

  async destroy(): Promise<void> {
    await this.lock();
    if (this.groupOpen) this.commitGroup();
    // Closing may remove the log: its last group is synced first.
    await this.log?.sync().catch(() => {});
    await this.log?.close();
    this.statements.clear();
    this.db.close();
  }
}

/** The lease behind a connection, also when the retrying dialect wrapped it. */
function leaseOf(c: DatabaseConnection): Lease {
  const l = c instanceof Lease ? c : (c as { inner?: unknown }).inner;
  if (!(l instanceof Lease)) throw new Error('not a connection of the SQLite driver');
  return l;
}
