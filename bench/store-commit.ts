// What a durable commit costs the coordinator's event loop: small
// transactions (one row of 200 bytes each, about what registering a machine
// writes) on a SQLite file in the system's temporary directory, one at a
// time and 50 in flight, in two modes:
//  - `full`: synchronous=FULL, SQLite's COMMIT waits for the disk on the
//    event loop's thread (the coordinator before the sync moved);
//  - `thread-pool`: synchronous=NORMAL and the driver's fdatasync of the
//    write-ahead log in libuv's thread pool (the coordinator now).
// Both acknowledge a transaction only once it is on disk. Per mode and
// concurrency: transactions per second and event-loop busy time per
// transaction. JSON on stdout.
//
//   node --import tsx bench/store-commit.ts [--transactions 3000] [--rounds 3]
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import SQLite from 'better-sqlite3-multiple-ciphers';
import { Kysely, sql } from 'kysely';
import { walSync } from '../coordinator/store/file-sync.js';
import { sqliteDialect } from '../coordinator/store/sqlite-driver.js';
import { percentile, round } from './lib/stats.js';

const { values } = parseArgs({
  options: { transactions: { type: 'string', default: '3000' }, rounds: { type: 'string', default: '3' } },
});
const n = Number(values.transactions);
const rounds = Number(values.rounds);
const MODES = ['full', 'thread-pool'] as const;
const dir = mkdtempSync(join(tmpdir(), 'meshgate-bench-commit-'));

function open(mode: (typeof MODES)[number], file: string): Kysely<{ t: { v: string } }> {
  const conn = new SQLite(file);
  conn.pragma('journal_mode = WAL');
  conn.pragma(mode === 'full' ? 'synchronous = FULL' : 'synchronous = NORMAL');
  conn.exec('create table if not exists t (id integer primary key, v text not null)');
  return new Kysely({
    dialect: sqliteDialect(conn, { log: mode === 'full' ? undefined : walSync(`${file}-wal`) }),
  });
}

async function run(db: Kysely<{ t: { v: string } }>, count: number, inFlight: number) {
  const row = 'x'.repeat(200);
  const loop0 = performance.eventLoopUtilization();
  const t0 = performance.now();
  let started = 0;
  await Promise.all(
    Array.from({ length: inFlight }, async () => {
      while (started++ < count)
        await db.transaction().execute((tx) => sql`insert into t (v) values (${row})`.execute(tx));
    }),
  );
  const ms = performance.now() - t0;
  const loop = performance.eventLoopUtilization(loop0);
  return { perSecond: (count / ms) * 1000, loopBusyMs: loop.active / count };
}

const sorted = (xs: number[]) => [...xs].sort((a, b) => a - b);
const results: Record<string, unknown> = {};
try {
  for (const inFlight of [1, 50]) {
    const count = inFlight === 1 ? Math.ceil(n / 3) : n;
    const samples: Record<string, { perSecond: number[]; loopBusyMs: number[] }> = {};
    // Modes take turns, so that a busy moment of the machine hits both.
    for (let r = 0; r < rounds; r++)
      for (const mode of MODES) {
        const db = open(mode, join(dir, `${mode}-${inFlight}-${r}.db`));
        await run(db, 100, inFlight);
        const s = await run(db, count, inFlight);
        await db.destroy();
        samples[mode] ??= { perSecond: [], loopBusyMs: [] };
        samples[mode].perSecond.push(s.perSecond);
        samples[mode].loopBusyMs.push(s.loopBusyMs);
      }
    results[`inFlight${inFlight}`] = Object.fromEntries(
      Object.entries(samples).map(([mode, s]) => [
        mode,
        {
          transactions: count,
          perSecondMedian: round(percentile(sorted(s.perSecond), 50), 0),
          loopBusyMsPerTransactionMedian: round(percentile(sorted(s.loopBusyMs), 50), 3),
        },
      ]),
    );
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
console.log(JSON.stringify({ transactions: n, rounds, ...results }, null, 2));
