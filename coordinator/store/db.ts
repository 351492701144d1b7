// Opens the database behind the coordinator: SQLite (embedded default,
// optionally encrypted, see sqlite.ts) or PostgreSQL. Everything above this
// file speaks Kysely only.
import { Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { walSync } from './file-sync.js';
import { type Dialect, migrate } from './migrations.js';
import type { Database } from './schema.js';
import { DatabaseError, openSqliteFile, sqlitePath } from './sqlite.js';
import { sqliteDialect } from './sqlite-driver.js';
import { retryingDialect } from './unavailable.js';

export interface StoreOptions {
  /** "sqlite:///path/to/file.db" (or a bare path) or "postgres://…". */
  url: string;
  /** The key of an encrypted SQLite database. */
  key?: string;
  /** How long a SQLite database locked by another process is waited for (default 5 s). */
  busyWaitMs?: number;
}

export interface Store {
  db: Kysely<Database>;
  dialect: Dialect;
  ping(): Promise<boolean>;
  close(): Promise<void>;
}

export async function openStore(opts: StoreOptions): Promise<Store> {
  const dialect: Dialect = /^postgres(ql)?:\/\//.test(opts.url) ? 'postgres' : 'sqlite';
  if (dialect === 'postgres' && opts.key !== undefined)
    throw new DatabaseError(
      'a database key file encrypts SQLite only; for PostgreSQL use its own at-rest encryption (see docs/security.md)',
    );
  // A failed sync of SQLite's log: the store takes no changes until a restart, and says it is not ready.
  let logFailed = false;
  const db =
    dialect === 'postgres'
      ? openPostgres(opts.url)
      : openSqlite(opts.url, opts.key, opts.busyWaitMs ?? 5000, () => {
          logFailed = true;
        });
  await migrate(db as Kysely<unknown>, dialect);
  return {
    db,
    dialect,
    async ping() {
      if (logFailed) return false;
      try {
        await sql`select 1`.execute(db);
        return true;
      } catch {
        return false;
      }
    },
    close: () => db.destroy(),
  };
}

function openSqlite(
  url: string,
  key: string | undefined,
  busyWaitMs: number,
  onLogFailure: () => void,
): Kysely<Database> {
  const path = sqlitePath(url);
  const conn = openSqliteFile(path, key);
  // WAL lets readers run beside the writer. Every acknowledged commit must
  // survive a power loss, not just a process crash: in WAL mode SQLite's
  // COMMIT leaves the disk to the driver (synchronous=NORMAL), which syncs
  // the log in the thread pool before acknowledging, instead of on the event
  // loop's thread. Where SQLite keeps another mode (a database in memory),
  // its own COMMIT waits for the disk (synchronous=FULL).
  const wal = conn.pragma('journal_mode = WAL', { simple: true }) === 'wal';
  conn.pragma(wal ? 'synchronous = NORMAL' : 'synchronous = FULL');
  conn.pragma('foreign_keys = ON');
  // SQLite's busy wait blocks the event loop: keep it short, the dialect retries asynchronously.
  conn.pragma('busy_timeout = 20');
  return new Kysely<Database>({
    dialect: retryingDialect(
      sqliteDialect(conn, { log: wal ? walSync(`${path}-wal`) : undefined, onLogFailure }),
      {
        busyWaitMs,
      },
    ),
  });
}

function openPostgres(url: string): Kysely<Database> {
  // Times are stored as bigint milliseconds; they fit a JS number exactly.
  pg.types.setTypeParser(pg.types.builtins.INT8, (v) => Number(v));
  return new Kysely<Database>({
    dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: url, max: 10 }) }),
  });
}
