// The SQLite file: opened plain or encrypted, and encrypted or re-keyed in
// place. Encryption is SQLite3MultipleCiphers in its SQLCipher 4 mode
// (AES-256-CBC, HMAC-SHA512 per page, PBKDF2-HMAC-SHA512 over the key file's
// text), so SQLCipher 4 tools open the same file with the same passphrase.
import { chmodSync, closeSync, existsSync, openSync, readSync, statSync } from 'node:fs';
import SQLite from 'better-sqlite3-multiple-ciphers';

export class DatabaseError extends Error {
  override name = 'DatabaseError';
}

const PLAIN_HEADER = Buffer.from('SQLite format 3\0', 'latin1');

export function sqlitePath(url: string): string {
  return url.replace(/^sqlite:\/\//, '');
}

/** "plain", "encrypted" (or not SQLite at all), or "empty" for a new file. */
function fileKind(path: string): 'plain' | 'encrypted' | 'empty' {
  if (path === ':memory:' || !existsSync(path) || statSync(path).size === 0) return 'empty';
  const head = Buffer.alloc(PLAIN_HEADER.length);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, head, 0, head.length, 0);
  } finally {
    closeSync(fd);
  }
  return head.equals(PLAIN_HEADER) ? 'plain' : 'encrypted';
}

function connect(path: string, key: string | undefined, timeout = 5000): SQLite.Database {
  const conn = new SQLite(path, { timeout });
  conn.pragma(`cipher = 'sqlcipher'`);
  conn.pragma('legacy = 4');
  if (key !== undefined) conn.key(Buffer.from(key, 'utf8'));
  try {
    conn.prepare('select count(*) from sqlite_master').get();
  } catch (err) {
    conn.close();
    if ((err as { code?: string }).code === 'SQLITE_NOTADB')
      throw new DatabaseError(`cannot open database ${path}: wrong database key`);
    throw err;
  }
  return conn;
}

/** Opens (or creates, 0600) the database; encrypted when `key` is given. */
export function openSqliteFile(path: string, key: string | undefined): SQLite.Database {
  const kind = fileKind(path);
  if (key !== undefined && kind === 'plain')
    throw new DatabaseError(
      `database ${path} is not encrypted; encrypt it first: meshgate coordinator db encrypt --database-key-file FILE`,
    );
  if (key === undefined && kind === 'encrypted')
    throw new DatabaseError(
      `database ${path} is encrypted (or not a SQLite database); pass --database-key-file`,
    );
  if (path !== ':memory:') {
    if (!existsSync(path)) closeSync(openSync(path, 'a', 0o600));
    chmodSync(path, 0o600);
  }
  return connect(path, key);
}

/** Encrypts a plain database, or changes the key of an encrypted one, in place. */
export function rekeySqliteFile(path: string, oldKey: string | undefined, newKey: string): void {
  if (!existsSync(path)) throw new DatabaseError(`no database at ${path}`);
  const kind = fileKind(path);
  if (oldKey === undefined && kind === 'encrypted')
    throw new DatabaseError(`database ${path} is already encrypted; use: meshgate coordinator db rekey`);
  if (oldKey !== undefined && kind === 'plain')
    throw new DatabaseError(`database ${path} is not encrypted; use: meshgate coordinator db encrypt`);
  const conn = connect(path, oldKey, 0);
  try {
    // Re-keying rewrites every page inside one rollback-journal transaction,
    // which WAL mode cannot do; leaving WAL also needs the only connection,
    // so a running coordinator is detected here.
    try {
      conn.pragma('journal_mode = DELETE');
    } catch (err) {
      if ((err as { code?: string }).code?.startsWith('SQLITE_BUSY'))
        throw new DatabaseError(`database ${path} is in use; stop the coordinator first`);
      throw err;
    }
    conn.rekey(Buffer.from(newKey, 'utf8'));
    conn.pragma('journal_mode = WAL');
  } finally {
    conn.close();
  }
}
