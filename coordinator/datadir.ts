// The coordinator's data dir: TLS key, SQLite database, admin socket.
//
// Only its owner may read it. And one coordinator per data dir: two would share the SQLite file and the admin
// socket (and the second would delete the first one's socket on exit).
//
// The lock is SQLite's own: an exclusive lock on a small database file,
// held for the life of the process. It is a kernel file lock (fcntl), so the
// kernel drops it when the process dies, even by kill -9; a PID file alone
// would stay behind after a crash and, once the PID is reused (after a
// reboot, say), keep the coordinator from starting. The PID file next to it
// only lets the second coordinator say who holds the lock.
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3-multiple-ciphers';

export class DataDirError extends Error {
  override name = 'DataDirError';
}

/** Creates the data dir, or refuses one that others can read: it holds the TLS key and the database. */
export function prepareDataDir(dir: string): void {
  if (!existsSync(dir)) {
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 });
    } catch (err) {
      throw new DataDirError(`cannot create data dir ${dir}: ${(err as NodeJS.ErrnoException).code ?? err}`);
    }
  }
  for (const f of [dir, join(dir, 'tls.key'), join(dir, 'meshgate.db')]) {
    if (existsSync(f) && (statSync(f).mode & 0o077) !== 0) {
      throw new DataDirError(`${f} is accessible by group or others; run: chmod go-rwx ${f}`);
    }
  }
}

export interface DataDirLock {
  release(): void;
}

export function lockDataDir(dataDir: string): DataDirLock {
  const pidFile = join(dataDir, 'coordinator.pid');
  const db = new Database(join(dataDir, 'coordinator.lock'), { timeout: 0 });
  try {
    db.pragma('journal_mode = MEMORY');
    db.pragma('locking_mode = EXCLUSIVE');
    // A write takes the exclusive lock; in this locking mode it is kept until the connection closes.
    db.exec('BEGIN EXCLUSIVE; CREATE TABLE IF NOT EXISTS held (pid INTEGER); COMMIT');
  } catch (err) {
    db.close();
    if ((err as { code?: string }).code !== 'SQLITE_BUSY') throw err;
    throw new DataDirError(
      `another coordinator${holder(pidFile)} is running with data dir ${dataDir}; stop it first, or give this one its own --data-dir`,
    );
  }
  const tmp = `${pidFile}.${process.pid}`;
  writeFileSync(tmp, `${process.pid}\n`, { mode: 0o600 });
  renameSync(tmp, pidFile);
  return {
    release() {
      rmSync(pidFile, { force: true });
      db.close();
    },
  };
}

function holder(pidFile: string): string {
  try {
    const pid = Number(readFileSync(pidFile, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? ` (PID ${pid})` : '';
  } catch {
    return '';
  }
}
