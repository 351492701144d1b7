// When SQLite cannot take a change (another process holds the write lock,
// the file or its file system is read-only, the disk is full or failing),
// callers get one typed error with a message a person can act on, not an
// internal error. A held lock is waited out for a bounded time with async
// retries: SQLite's own busy wait would stop the event loop, and every
// stream with it, for as long as it waits.
import { setTimeout as sleep } from 'node:timers/promises';
import type {
  CompiledQuery,
  DatabaseConnection,
  Dialect,
  Driver,
  QueryCompiler,
  QueryResult,
  TransactionSettings,
} from 'kysely';

export class StoreUnavailableError extends Error {
  override name = 'StoreUnavailableError';
}

function sqliteCode(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && code.startsWith('SQLITE_') ? code : '';
}

const isBusy = (code: string) => code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED');

/** The error callers should see for a SQLite failure that is not theirs, or null for any other error. */
export function storeUnavailable(err: unknown): StoreUnavailableError | null {
  const code = sqliteCode(err);
  if (isBusy(code))
    return new StoreUnavailableError(
      "the coordinator's database is locked by another process; nothing was changed, retry later",
    );
  if (code.startsWith('SQLITE_READONLY'))
    return new StoreUnavailableError(
      "the coordinator's database is read-only (file permissions or a read-only file system); nothing was changed",
    );
  if (code === 'SQLITE_FULL')
    return new StoreUnavailableError("the coordinator's disk is full; nothing was changed");
  if (code.startsWith('SQLITE_IOERR') || code.startsWith('SQLITE_CANTOPEN'))
    return new StoreUnavailableError(`the coordinator cannot read or write its database (${code})`);
  return null;
}

export interface RetryOptions {
  /** How long a locked database is retried before the call fails. */
  busyWaitMs: number;
}

/** `inner` with every statement retried while the database is locked, and SQLite failures made typed. */
export function retryingDialect(inner: Dialect, opts: RetryOptions): Dialect {
  return {
    createAdapter: () => inner.createAdapter(),
    createDriver: () => new RetryingDriver(inner.createDriver(), opts),
    createIntrospector: (db) => inner.createIntrospector(db),
    createQueryCompiler: () => inner.createQueryCompiler(),
  };
}

class RetryingConnection implements DatabaseConnection {
  constructor(
    readonly inner: DatabaseConnection,
    private readonly opts: RetryOptions,
  ) {}

  async executeQuery<R>(query: CompiledQuery): Promise<QueryResult<R>> {
    const deadline = Date.now() + this.opts.busyWaitMs;
    for (let delay = 5; ; delay = Math.min(delay * 2, 200)) {
      try {
        return await this.inner.executeQuery<R>(query);
      } catch (err) {
        const left = deadline - Date.now();
        if (isBusy(sqliteCode(err)) && left > 0) {
          await sleep(Math.min(delay, left));
          continue;
        }
        throw storeUnavailable(err) ?? err;
      }
    }
  }

  streamQuery<R>(query: CompiledQuery, chunkSize?: number): AsyncIterableIterator<QueryResult<R>> {
    return this.inner.streamQuery<R>(query, chunkSize);
  }
}

/** Hands out retrying connections; transactions run their BEGIN and COMMIT through them too. */
class RetryingDriver implements Driver {
  constructor(
    private readonly inner: Driver,
    private readonly opts: RetryOptions,
  ) {}

  init(): Promise<void> {
    return this.inner.init();
  }

  async acquireConnection(): Promise<DatabaseConnection> {
    return new RetryingConnection(await this.inner.acquireConnection(), this.opts);
  }

  beginTransaction(c: DatabaseConnection, settings: TransactionSettings): Promise<void> {
    return this.inner.beginTransaction(c, settings);
  }

  commitTransaction(c: DatabaseConnection): Promise<void> {
    return this.inner.commitTransaction(c);
  }

  rollbackTransaction(c: DatabaseConnection): Promise<void> {
    return this.inner.rollbackTransaction(c);
  }

  async savepoint(c: DatabaseConnection, name: string, compile: QueryCompiler['compileQuery']) {
    await this.inner.savepoint?.(c, name, compile);
  }

  async rollbackToSavepoint(c: DatabaseConnection, name: string, compile: QueryCompiler['compileQuery']) {
    await this.inner.rollbackToSavepoint?.(c, name, compile);
  }

  async releaseSavepoint(c: DatabaseConnection, name: string, compile: QueryCompiler['compileQuery']) {
    await this.inner.releaseSavepoint?.(c, name, compile);
  }

  releaseConnection(c: DatabaseConnection): Promise<void> {
    return this.inner.releaseConnection((c as RetryingConnection).inner);
  }

  destroy(): Promise<void> {
    return this.inner.destroy();
  }
}
