// A coordinator whose database is locked by another process answers
// UNAVAILABLE with the reason, which agents retry, never "internal error".
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import SQLite from 'better-sqlite3-multiple-ciphers';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

describe('coordinator with a locked database', () => {
  let t: TestCoordinator;
  let other: SQLite.Database;
  const agents: SimAgent[] = [];
  const agent = () => {
    const a = new SimAgent(t.url, t.fingerprint);
    agents.push(a);
    return a;
  };

  before(async () => {
    t = await startTestCoordinator();
    other = new SQLite(join(t.dataDir, 'meshgate.db'));
  });
  after(async () => {
    if (other.inTransaction) other.exec('rollback');
    other.close();
    for (const a of agents) a.close();
    await t.close();
  });

  it('refuses a registration with UNAVAILABLE while the lock is held, and takes it once released', async () => {
    const key = await authKey(t, 'locked', { reusable: true });
    other.exec('begin immediate');
    const started = Date.now();
    await assert.rejects(agent().register(key, 'waits'), (err: grpc.ServiceError) => {
      assert.equal(err.code, grpc.status.UNAVAILABLE, err.details);
      assert.match(err.details, /database is locked by another process; nothing was changed, retry later/);
      return true;
    });
    const took = Date.now() - started;
    assert.ok(took < 10_000, `answered after ${took} ms`);
    assert.ok(
      t.logs.some((l) => l.includes('database unavailable')),
      'the operator sees why in the log',
    );
    assert.ok(!t.logs.some((l) => l.includes('internal error')), 'not an internal error');
    other.exec('rollback');
    const reg = await agent().register(key, 'joins');
    assert.equal(reg.node!.name, 'joins');
    assert.deepEqual(
      (await t.admin.call('listNodes', { project: 'locked' })).nodes.map((n) => n.name),
      ['joins'],
      'the refused registration left nothing behind',
    );
  });
});
