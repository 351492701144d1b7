// A database made before API key scopes and the audit project column: its
// keys stay global and its audit entries are found by project after the
// migrations run. And who makes a commit durable: the driver in WAL mode,
// SQLite itself otherwise.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import SQLite from 'better-sqlite3-multiple-ciphers';
import { Kysely, Migrator, SqliteDialect, sql } from 'kysely';
import { State } from '../../coordinator/state/state.js';
import { openStore } from '../../coordinator/store/db.js';
import { migrations } from '../../coordinator/store/migrations.js';

describe('migrations of an existing database', () => {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-store-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('keeps old API keys global and files old audit entries under their project', async () => {
    const path = join(dir, 'old.db');
    const old = new Kysely<Record<string, Record<string, unknown>>>({
      dialect: new SqliteDialect({ database: new SQLite(path) }),
    });
    const first = { '0001_initial': migrations('sqlite')['0001_initial']! };
    const { error } = await new Migrator({
      db: old,
      provider: { getMigrations: async () => first },
    }).migrateToLatest();
    assert.equal(error, undefined);
    await old.insertInto('projects').values({ name: 'p', created_at: 1 }).execute();
    await old
      .insertInto('api_keys')
      .values({
        id: '0123456789ab',
        secret_hash: 'x',
        description: 'old',
        created_at: 1,
        expires_at: Date.now() + 3_600_000,
        last_seen: null,
        revoked_at: null,
      })
      .execute();
    const entry = (action: string, target: string, detail: object) => ({
      at: 2,
      actor: 'local-socket',
      action,
      target,
      detail: JSON.stringify(detail),
    });
    await old
      .insertInto('audit_log')
      .values([
        entry('apikey.create', '0123456789ab', { description: 'old' }),
        entry('project.create', 'p', {}),
        entry('node.delete', 'n1', { project: 'p', name: 'web' }),
        entry('policy.set', 'p', {}),
      ])
      .execute();
    await old.destroy();

    const store = await openStore({ url: `sqlite://${path}` });
    try {
      const state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
      const [key] = await state.keys.listApiKeys();
      assert.deepEqual([key!.projects, key!.readOnly], [null, false]);
      const inP = await state.auditLog({ projects: ['p'], since: null, limit: 100 });
      assert.deepEqual(
        inP.map((e) => e.action),
        ['project.create', 'node.delete', 'policy.set'],
      );
      const all = await state.auditLog({ projects: null, since: null, limit: 100 });
      assert.equal(all.length, 4);
      assert.equal(all[0]!.project, null);
    } finally {
      await store.close();
    }
  });
});

describe('durability of the SQLite store', () => {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-store-sync-'));
  after(() => rmSync(dir, { recursive: true, force: true }));
  const modes = async (url: string) => {
    const store = await openStore({ url });
    try {
      const journal = await sql<{ journal_mode: string }>`pragma journal_mode`.execute(store.db);
      const sync = await sql<{ synchronous: number }>`pragma synchronous`.execute(store.db);
      return [journal.rows[0]!.journal_mode, sync.rows[0]!.synchronous];
    } finally {
      await store.close();
    }
  };

  it('syncs a file database in WAL mode through the driver, and one in memory through SQLite', async () => {
    // synchronous: 1 is NORMAL (the driver syncs the log), 2 is FULL (SQLite's COMMIT does).
    assert.deepEqual(await modes(join(dir, 'file.db')), ['wal', 1]);
    assert.deepEqual(await modes(':memory:'), ['memory', 2]);
  });
});
