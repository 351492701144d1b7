// SIGTERM ends the coordinator within seconds even when an agent stopped
// reading its stream (a host that froze without closing TCP), and the
// last_seen times reach the database before it exits.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, it } from 'node:test';
import { connectAdmin } from '../../cli/admin-client.js';
import { startCoordinator, stop } from './process.js';

const dataDir = mkdtempSync(join(tmpdir(), 'meshgate-shutdown-'));
after(() => rmSync(dataDir, { recursive: true, force: true }));

/** Grace for streams (3 s) plus the database and process exit, with room for a busy machine. */
const EXIT_BOUND_MS = 8000;

function startHeldAgent(url: string, fingerprint: string, key: string) {
  const proc = spawn(
    process.execPath,
    ['--import', 'tsx', join(import.meta.dirname, 'held-agent.ts'), url, fingerprint, key, 'frozen'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const ready = new Promise<string>((resolve, reject) => {
    let out = '';
    let err = '';
    proc.stdout!.on('data', (d) => {
      out += d;
      const m = /ready (\S+)/.exec(out);
      if (m) resolve(m[1]!);
    });
    proc.stderr!.on('data', (d) => {
      err += d;
    });
    proc.once('exit', (code) => reject(new Error(`held agent exited with ${code}: ${err}`)));
    setTimeout(() => reject(new Error('held agent did not connect within 30 s')), 30_000).unref();
  });
  return { proc, ready };
}

it('exits within seconds of SIGTERM with a frozen agent, last_seen written', async (t) => {
  const c = await startCoordinator(dataDir);
  let agent: ReturnType<typeof startHeldAgent> | null = null;
  try {
    const admin = await connectAdmin({ socket: join(dataDir, 'admin.sock'), output: 'json' });
    await admin.call('createProject', { name: 'frozen' });
    const created = await admin.call('createAuthKey', {
      project: 'frozen',
      reusable: false,
      ephemeral: false,
      tags: [],
      expiration: '1h',
    });
    admin.close();
    agent = startHeldAgent(`grpcs://127.0.0.1:${c.grpcPort}`, c.fingerprint, created.authKey!.key);
    const nodeId = await agent.ready;
    agent.proc.kill('SIGSTOP');

    const termAt = Date.now();
    const code = await Promise.race([
      stop(c.proc, 'SIGTERM'),
      new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 30_000).unref()),
    ]);
    const tookMs = Date.now() - termAt;
    t.diagnostic(`exit ${tookMs} ms after SIGTERM`);
    assert.notEqual(code, 'timeout', 'the coordinator was still running 30 s after SIGTERM');
    assert.equal(code, 0, 'a clean exit');
    assert.ok(tookMs < EXIT_BOUND_MS, `exited ${tookMs} ms after SIGTERM (bound ${EXIT_BOUND_MS} ms)`);

    const { default: Database } = await import('better-sqlite3-multiple-ciphers');
    const db = new Database(join(dataDir, 'meshgate.db'), { readonly: true });
    const row = db.prepare('SELECT last_seen FROM nodes WHERE id = ?').get(nodeId) as { last_seen: number };
    db.close();
    assert.ok(
      Number(row.last_seen) >= termAt,
      `last_seen is the time the stream was closed at shutdown (${row.last_seen} < ${termAt})`,
    );
  } finally {
    agent?.proc.kill('SIGKILL');
    if (c.proc.exitCode === null && c.proc.signalCode === null) c.proc.kill('SIGKILL');
  }
});
