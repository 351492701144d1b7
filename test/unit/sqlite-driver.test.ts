import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, beforeEach, describe, it } from 'node:test';
import SQLite from 'better-sqlite3-multiple-ciphers';
import { Kysely, sql } from 'kysely';
import { Coalesced, walSync } from '../../coordinator/store/file-sync.js';
import { GROUP_LIMIT, sqliteDialect } from '../../coordinator/store/sqlite-driver.js';
import { StoreUnavailableError } from '../../coordinator/store/unavailable.js';

interface Db {
  t: { id: number; v: string };
}

const dir = mkdtempSync(join(tmpdir(), 'meshgate-driver-'));
after(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
let conn: SQLite.Database;
let db: Kysely<Db>;
/** Every BEGIN / COMMIT / ROLLBACK the driver sent, and when each transaction's promise settled. */
let events: string[];
/** Makes the next COMMIT fail as a failing disk would. */
let failCommit = false;

beforeEach(async () => {
  conn = new SQLite(join(dir, `db-${n++}.sqlite`));
  conn.pragma('journal_mode = WAL');
  conn.pragma('synchronous = FULL');
  conn.exec('create table t (id integer primary key, v text not null)');
  events = [];
  const exec = conn.exec.bind(conn);
  conn.exec = (s: string) => {
    if (/^(begin|commit|rollback)$/.test(s)) events.push(s);
    if (s === 'commit' && failCommit) {
      failCommit = false;
      throw Object.assign(new Error('disk I/O error'), { code: 'SQLITE_IOERR_WRITE' });
    }
    return exec(s);
  };
  db = new Kysely<Db>({ dialect: sqliteDialect(conn) });
});

const insert = (id: number, fail = false) =>
  db
    .transaction()
    .execute(async (tx) => {
      await tx
        .insertInto('t')
        .values({ id, v: `row ${id}` })
        .execute();
      if (fail) throw new Error(`transaction ${id} gives up`);
    })
    .then(() => events.push(`done ${id}`));

/** Lets the event loop turn until `cond` holds; fails after 5 s. */
const until = async (what: string, cond: () => boolean) => {
  const end = Date.now() + 5000;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`never happened: ${what} (${events.join(', ')})`);
    await new Promise((r) => setImmediate(r));
  }
};

const ids = async () => (await db.selectFrom('t').select('id').orderBy('id').execute()).map((r) => r.id);

describe('SQLite driver: group commit', () => {
  it('transactions started together share one COMMIT, and none returns before it', async () => {
    await Promise.all(Array.from({ length: 20 }, (_, i) => insert(i + 1)));
    assert.deepEqual(
      await ids(),
      Array.from({ length: 20 }, (_, i) => i + 1),
    );
    assert.deepEqual(
      events.filter((e) => e === 'commit'),
      ['commit'],
      `one COMMIT for 20 transactions: ${events.join(', ')}`,
    );
    const commitAt = events.indexOf('commit');
    for (let i = 1; i <= 20; i++) assert.ok(events.indexOf(`done ${i}`) > commitAt, `transaction ${i}`);
    // And it is on disk: another connection reads it.
    const other = new SQLite(conn.name, { readonly: true });
    assert.equal((other.prepare('select count(*) as c from t').get() as { c: number }).c, 20);
    other.close();
  });

  it('a group holds at most GROUP_LIMIT transactions', async () => {
    const count = GROUP_LIMIT * 2 + 1;
    await Promise.all(Array.from({ length: count }, (_, i) => insert(i + 1)));
    assert.equal((await ids()).length, count);
    assert.equal(events.filter((e) => e === 'commit').length, 3);
  });

  it('a transaction that fails undoes only its own changes', async () => {
    const results = await Promise.allSettled([insert(1), insert(2, true), insert(3)]);
    assert.deepEqual(
      results.map((r) => r.status),
      ['fulfilled', 'rejected', 'fulfilled'],
    );
    assert.match(String((results[1] as PromiseRejectedResult).reason), /transaction 2 gives up/);
    assert.deepEqual(await ids(), [1, 3]);
  });

  it('a failed COMMIT fails every transaction of the group with a typed error; the next one works', async () => {
    failCommit = true;
    const results = await Promise.allSettled([insert(1), insert(2), insert(3)]);
    for (const r of results) {
      assert.equal(r.status, 'rejected');
      assert.ok((r as PromiseRejectedResult).reason instanceof StoreUnavailableError);
      assert.match(String((r as PromiseRejectedResult).reason), /cannot read or write its database/);
    }
    assert.deepEqual(await ids(), []);
    await insert(4);
    assert.deepEqual(await ids(), [4]);
  });

  it('a statement outside a transaction waits for nothing and commits what is pending first', async () => {
    const pending = insert(1);
    // Issued while transaction 1 waits for its COMMIT: that COMMIT comes first.
    await sql`insert into t (id, v) values (2, 'outside')`.execute(db);
    assert.equal(events.filter((e) => e === 'commit').length, 1);
    await pending;
    assert.deepEqual(await ids(), [1, 2]);
  });

  it('a transaction inside a connection that goes on afterwards keeps its turn', async () => {
    await db.connection().execute(async (c) => {
      await c.transaction().execute((tx) => tx.insertInto('t').values({ id: 1, v: 'a' }).execute());
      await c.insertInto('t').values({ id: 2, v: 'b' }).execute();
    });
    assert.deepEqual(await ids(), [1, 2]);
  });
});

describe('SQLite driver: commits made durable off the event loop', () => {
  /** A sync the test finishes by hand; `syncs` holds the pending ones, oldest first. */
  let syncs: { resolve(): void; reject(e: Error): void }[];
  const sync = () =>
    new Promise<void>((resolve, reject) => {
      events.push('sync');
      syncs.push({ resolve, reject });
    });

  /** What the driver reported when a sync failed. */
  let failures: Error[];

  beforeEach(() => {
    syncs = [];
    failures = [];
    db = new Kysely<Db>({
      dialect: sqliteDialect(conn, {
        log: { sync, close: async () => {} },
        onLogFailure: (err) => failures.push(err),
      }),
    });
  });

  it('acknowledges a group only after the sync that follows its COMMIT; the next group commits meanwhile', async () => {
    const first = Promise.all([insert(1), insert(2)]);
    await until('a sync', () => syncs.length === 1);
    assert.deepEqual(events, ['begin', 'commit', 'sync']);
    const second = insert(3);
    await until('a second sync', () => syncs.length === 2);
    assert.deepEqual(events, ['begin', 'commit', 'sync', 'begin', 'commit', 'sync'], 'the loop went on');
    syncs[1]!.resolve();
    await second;
    assert.ok(!events.includes('done 1'), 'the first group waits for its own sync');
    syncs[0]!.resolve();
    await first;
    assert.deepEqual(events.slice(6), ['done 3', 'done 1', 'done 2']);
  });

  it('a failed sync fails every transaction of its group with a typed error, and no change is taken after it', async () => {
    const group = Promise.allSettled([insert(1), insert(2)]);
    await until('a sync', () => syncs.length === 1);
    syncs[0]!.reject(new StoreUnavailableError('the coordinator cannot write its database to disk (EIO)'));
    for (const r of await group) {
      assert.equal(r.status, 'rejected');
      assert.match(String((r as PromiseRejectedResult).reason), /cannot write its database to disk \(EIO\)/);
    }
    assert.equal(failures.length, 1, 'the failure is reported');
    const refused = (e: Error) =>
      e instanceof StoreUnavailableError &&
      /takes no changes since a sync of its database to disk failed \(.*EIO\).*restart it/.test(e.message);
    await assert.rejects(insert(3), refused);
    await assert.rejects(sql`insert into t (id, v) values (4, 'outside')`.execute(db), refused);
    assert.deepEqual(
      await ids(),
      [1, 2],
      'reads go on; the failed group is in the file, the refused changes are not',
    );
    assert.equal(syncs.length, 1, 'no sync could be trusted after the failed one');
    assert.equal(failures.length, 1, 'reported once');
  });

  it('a sync that ends after another failed acknowledges nothing: the kernel may have dropped what the failed one could not write', async () => {
    const first = insert(1);
    await until('a sync', () => syncs.length === 1);
    const second = insert(2);
    await until('a second sync', () => syncs.length === 2);
    const third = insert(3);
    await until('a third sync', () => syncs.length === 3);
    syncs[0]!.reject(new StoreUnavailableError('the coordinator cannot write its database to disk (EIO)'));
    await assert.rejects(first, /EIO/);
    syncs[1]!.resolve();
    await assert.rejects(second, /takes no changes since a sync of its database to disk failed/);
    syncs[2]!.reject(new StoreUnavailableError('the coordinator cannot write its database to disk (ENOSPC)'));
    await assert.rejects(third, /ENOSPC/);
    assert.equal(failures.length, 1, 'the first failure is reported, once');
    await assert.rejects(insert(4), /failed \(the coordinator cannot write its database to disk \(EIO\)\)/);
  });

  it('a group that only read is acknowledged without a sync', async () => {
    const outside = sql`insert into t (id, v) values (1, 'outside')`.execute(db);
    await until('a sync', () => syncs.length === 1);
    syncs[0]!.resolve();
    await outside;
    const read = await db.transaction().execute((tx) => tx.selectFrom('t').select('id').execute());
    assert.deepEqual(read, [{ id: 1 }]);
    assert.equal(syncs.length, 1, 'the change outside a transaction had its own sync, the read none');
  });

  it('a failed sync of a change outside a transaction stops further changes too', async () => {
    const outside = sql`insert into t (id, v) values (1, 'outside')`.execute(db);
    await until('a sync', () => syncs.length === 1);
    syncs[0]!.reject(new StoreUnavailableError('the coordinator cannot write its database to disk (EIO)'));
    await assert.rejects(outside, /cannot write its database to disk/);
    await assert.rejects(insert(2), /takes no changes/);
    assert.equal(failures.length, 1);
  });

  it('a change outside a transaction returns once synced, and others use the connection meanwhile', async () => {
    let done = false;
    const outside = sql`insert into t (id, v) values (1, 'outside') returning id`.execute(db).then(() => {
      done = true;
    });
    await until('a sync', () => syncs.length === 1);
    assert.equal(done, false);
    assert.deepEqual(await ids(), [1], 'a read does not wait for the sync');
    syncs[0]!.resolve();
    await outside;
    assert.equal(done, true);
  });

  it('closing syncs the last group before the log can go', async () => {
    const pending = insert(1);
    await until('a sync', () => syncs.length === 1);
    syncs[0]!.resolve();
    await pending;
    const closing = db.destroy();
    await until('a second sync', () => syncs.length === 2);
    assert.equal(conn.open, true, 'not closed before the sync');
    syncs[1]!.resolve();
    await closing;
    assert.equal(conn.open, false);
  });
});

describe('file sync', () => {
  it('callers during a sync share the next one', async () => {
    const runs: (() => void)[] = [];
    const c = new Coalesced(() => new Promise<void>((r) => runs.push(r)));
    const first = c.run();
    const later = [c.run(), c.run(), c.run()];
    assert.equal(runs.length, 1);
    runs[0]!();
    await first;
    await until('the queued run', () => runs.length === 2);
    assert.equal(runs.length, 2, 'one more run for the three who asked during the first');
    runs[1]!();
    await Promise.all(later);
    const after = c.run();
    assert.equal(runs.length, 3, 'a caller after both starts a run of its own');
    runs[2]!();
    await after;
  });

  it('a failed run fails its callers, not the run after it', async () => {
    const outcomes = ['EIO', ''];
    const c = new Coalesced(async () => {
      const failure = outcomes.shift();
      if (failure) throw new Error(failure);
    });
    const first = c.run();
    const queued = c.run();
    await assert.rejects(first, /EIO/);
    await queued;
    assert.deepEqual(outcomes, []);
  });

  it('syncs a real log, and says which file it could not sync', async () => {
    const path = join(dir, 'wal-sync.sqlite');
    const c = new SQLite(path);
    c.pragma('journal_mode = WAL');
    c.exec('create table x (v)');
    const log = walSync(`${path}-wal`);
    await log.sync();
    await log.sync();
    await log.close();
    c.close();
    await assert.rejects(
      walSync(join(dir, 'missing-wal')).sync(),
      (e: Error) =>
        e instanceof StoreUnavailableError &&
        /cannot write its database to disk \(ENOENT on .*missing-wal\)/.test(e.message),
    );
  });
});
