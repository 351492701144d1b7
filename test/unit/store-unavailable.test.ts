// A SQLite database that cannot take a change: a write lock held by another
// process is waited out for a bounded time without stopping the event loop;
// then, and at once for a read-only database, the caller gets a typed error
// that says what is wrong.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import SQLite from 'better-sqlite3-multiple-ciphers';
import { sql } from 'kysely';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { StoreUnavailableError } from '../../coordinator/store/unavailable.js';

describe('store: locked and read-only database', () => {
  let dir: string;
  let store: Store;
  let state: State;
  let other: SQLite.Database;
  const BUSY_WAIT = 400;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'meshgate-store-'));
    const file = join(dir, 'meshgate.db');
    store = await openStore({ url: file, busyWaitMs: BUSY_WAIT });
    state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    other = new SQLite(file);
  });
  afterEach(async () => {
    if (other.inTransaction) other.exec('rollback');
    other.close();
    await state.close();
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const unavailable = (re: RegExp) => (err: unknown) => {
    assert.ok(err instanceof StoreUnavailableError, String(err));
    assert.match(err.message, re);
    return true;
  };

  it('gives up on a lock held too long with a typed error, and keeps serving meanwhile', async () => {
    other.exec('begin immediate');
    let ticks = 0;
    const ticker = setInterval(() => ticks++, 10);
    const started = Date.now();
    try {
      await assert.rejects(
        state.createProject('test', 'p'),
        unavailable(/database is locked by another process; nothing was changed, retry later/),
      );
    } finally {
      clearInterval(ticker);
    }
    const took = Date.now() - started;
    assert.ok(took >= BUSY_WAIT - 50 && took < BUSY_WAIT + 5000, `gave up after ${took} ms`);
    // SQLite's own busy wait would block the loop for all of it: no tick at all.
    assert.ok(ticks >= 5, `the event loop ran while waiting (${ticks} ticks in ${took} ms)`);
    assert.deepEqual(state.listProjects(), [], 'nothing changed in memory');
    other.exec('rollback');
    await state.createProject('test', 'p');
    assert.deepEqual(
      state.listProjects().map((p) => p.name),
      ['p'],
    );
  });

  it('waits out a lock that is released in time', async () => {
    other.exec('begin immediate');
    const release = setTimeout(() => other.exec('rollback'), BUSY_WAIT / 4);
    try {
      await state.createProject('test', 'p');
    } finally {
      clearTimeout(release);
    }
    assert.deepEqual(
      state.listProjects().map((p) => p.name),
      ['p'],
    );
  });

  it('refuses a change to a read-only database at once, and still answers reads', async () => {
    await state.createProject('test', 'p');
    await sql`pragma query_only = on`.execute(store.db);
    const started = Date.now();
    await assert.rejects(state.createProject('test', 'q'), unavailable(/database is read-only/));
    assert.ok(Date.now() - started < BUSY_WAIT, 'no waiting: a read-only database does not heal by itself');
    assert.deepEqual(
      state.listProjects().map((p) => p.name),
      ['p'],
    );
    assert.equal(await store.ping(), true);
  });
});
