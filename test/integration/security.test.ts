// /metrics behind a bearer token, and the SQLite database encrypted at rest:
// no plaintext in the files, a wrong or missing key refused in one line,
// encrypt and rekey of an existing database keeping its data.
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';
import { meshgate } from './process.js';

function get(
  t: TestCoordinator,
  path: string,
  authorization?: string,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const r = request(
      {
        host: '127.0.0.1',
        port: t.c.httpPort,
        path,
        ca: readFileSync(join(t.dataDir, 'tls.crt')),
        servername: 'localhost',
        headers: authorization ? { authorization } : {},
      },
      (res) => {
        let body = '';
        res.on('data', (d) => {
          body += d;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      },
    );
    r.on('error', reject);
    r.end();
  });
}

const scratch = mkdtempSync(join(tmpdir(), 'meshgate-sec-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

function secretFile(name: string, text: string, mode = 0o600): string {
  const f = join(scratch, name);
  writeFileSync(f, `${text}\n`);
  chmodSync(f, mode);
  return f;
}

describe('/metrics with a bearer token', () => {
  it('refuses a wrong token like a wrong API key: logged, counted, throttled per address', async () => {
    const token = 'scrape-token-0123456789abcdef';
    const t = await startTestCoordinator({
      metricsTokenFile: secretFile('metrics.token', token),
      authFailureRate: { perSecond: 0.001, burst: 3 },
    });
    try {
      assert.equal((await get(t, '/metrics')).status, 401);
      assert.equal((await get(t, '/metrics', 'Bearer wrong-token')).status, 401);
      assert.equal((await get(t, '/metrics', `Basic ${token}`)).status, 401);
      const refusals = t.logs.filter((l) => l.includes('"msg":"refused call"')).map((l) => JSON.parse(l));
      assert.equal(refusals.length, 3);
      for (const l of refusals) {
        assert.deepEqual(
          { api: l.api, peer: l.peer, method: l.method, reason: l.reason },
          { api: 'rest', peer: '127.0.0.1', method: 'GET /metrics', reason: 'bad or missing metrics token' },
        );
        assert.ok(!JSON.stringify(l).includes('wrong-token'), 'the token tried is not logged');
      }
      // Three guesses spent the address's budget: now even the right token waits.
      const held = await get(t, '/metrics', `Bearer ${token}`);
      assert.equal(held.status, 429);
      assert.match(held.body, /too many failed authentications from this address/);
      assert.equal((await get(t, '/healthz')).status, 200, 'health stays open');
    } finally {
      await t.close();
    }
  });

  it('answers the right token, and refuses a token file others can read', async () => {
    const token = 'scrape-token-0123456789abcdef';
    const t = await startTestCoordinator({ metricsTokenFile: secretFile('metrics2.token', token) });
    try {
      assert.equal((await get(t, '/metrics', 'Bearer wrong-token')).status, 401);
      const ok = await get(t, '/metrics', `Bearer ${token}`);
      assert.equal(ok.status, 200);
      assert.match(ok.body, /^meshgate_nodes_online \d+$/m);
      assert.match(ok.body, /^meshgate_auth_failures_total\{api="rest"\} 1$/m);
    } finally {
      await t.close();
    }
    const open = secretFile('open.token', token, 0o644);
    await assert.rejects(
      startTestCoordinator({ dataDir: mkdtempSync(join(scratch, 'm-')), metricsTokenFile: open }),
      {
        name: 'ConfigError',
        message: `metrics token file ${open} is accessible by group or others; run: chmod 600 ${open}`,
      },
    );
  });
});

describe('SQLite encrypted at rest', () => {
  const PROJECT = 'confidential-tenant';

  /** Starts a coordinator on `dataDir` and stops it without removing the directory. */
  async function session<T>(
    dataDir: string,
    keyFile: string | undefined,
    body: (t: TestCoordinator) => Promise<T>,
  ): Promise<T> {
    const t = await startTestCoordinator({ dataDir, databaseKeyFile: keyFile });
    try {
      return await body(t);
    } finally {
      t.admin.close();
      await t.c.close();
    }
  }
  const projects = (dataDir: string, keyFile: string | undefined) =>
    session(dataDir, keyFile, async (t) =>
      (await t.admin.call('listProjects', {})).projects.map((p) => p.name),
    );
  const fileText = (dataDir: string) =>
    ['meshgate.db', 'meshgate.db-wal']
      .map((f) => join(dataDir, f))
      .filter(existsSync)
      .map((f) => readFileSync(f).toString('latin1'))
      .join('');
  const db = (dataDir: string) => ['--data-dir', dataDir];

  it('keeps project names out of the file, refuses a wrong or missing key, and rekeys', async () => {
    const dataDir = mkdtempSync(join(scratch, 'enc-'));
    const k1 = secretFile('k1', 'first database key');
    const k2 = secretFile('k2', 'second database key');
    await session(dataDir, k1, async (t) => {
      await authKey(t, PROJECT);
      const agent = new SimAgent(t.url, t.fingerprint);
      try {
        await agent.register(await authKey(t, PROJECT), 'db-host');
      } finally {
        agent.close();
      }
      assert.ok(!fileText(dataDir).includes(PROJECT), 'no plaintext while running (WAL)');
    });
    assert.ok(!fileText(dataDir).includes(PROJECT), 'no plaintext at rest');
    assert.ok(!fileText(dataDir).includes('db-host'));

    await assert.rejects(startTestCoordinator({ dataDir, databaseKeyFile: k2 }), {
      name: 'DatabaseError',
      message: `cannot open database ${join(dataDir, 'meshgate.db')}: wrong database key`,
    });
    await assert.rejects(startTestCoordinator({ dataDir }), {
      name: 'DatabaseError',
      message: /is encrypted \(or not a SQLite database\); pass --database-key-file$/,
    });

    const wrong = await meshgate([
      'coordinator',
      'db',
      'rekey',
      ...db(dataDir),
      '--database-key-file',
      k2,
      '--new-key-file',
      k1,
    ]);
    assert.equal(wrong.code, 1);
    assert.equal(
      wrong.stderr,
      `meshgate: cannot open database ${join(dataDir, 'meshgate.db')}: wrong database key\n`,
    );

    const rekey = await meshgate([
      'coordinator',
      'db',
      'rekey',
      ...db(dataDir),
      '--database-key-file',
      k1,
      '--new-key-file',
      k2,
    ]);
    assert.equal(rekey.code, 0, rekey.stderr);
    assert.deepEqual(await projects(dataDir, k2), [PROJECT]);
    await assert.rejects(startTestCoordinator({ dataDir, databaseKeyFile: k1 }), /wrong database key/);
    const nodes = await session(dataDir, k2, async (t) => (await t.admin.call('listNodes', {})).nodes);
    assert.deepEqual(
      nodes.map((n) => n.name),
      ['db-host'],
    );
  });

  it('encrypts an existing plain database in place', async () => {
    const dataDir = mkdtempSync(join(scratch, 'plain-'));
    const key = secretFile('k3', 'third database key');
    await session(dataDir, undefined, (t) => t.admin.call('createProject', { name: PROJECT }));
    assert.ok(fileText(dataDir).includes(PROJECT), 'a plain database shows the name (the check can see it)');
    await assert.rejects(startTestCoordinator({ dataDir, databaseKeyFile: key }), {
      name: 'DatabaseError',
      message: /is not encrypted; encrypt it first: meshgate coordinator db encrypt/,
    });

    const enc = await meshgate(['coordinator', 'db', 'encrypt', ...db(dataDir), '--database-key-file', key]);
    assert.equal(enc.code, 0, enc.stderr);
    assert.ok(!fileText(dataDir).includes(PROJECT));
    assert.deepEqual(await projects(dataDir, key), [PROJECT]);

    const again = await meshgate([
      'coordinator',
      'db',
      'encrypt',
      ...db(dataDir),
      '--database-key-file',
      key,
    ]);
    assert.equal(again.code, 1);
    assert.match(
      again.stderr,
      /^meshgate: database \S+ is already encrypted; use: meshgate coordinator db rekey\n$/,
    );
  });

  it('does not re-key a database a running coordinator holds', async () => {
    const dataDir = mkdtempSync(join(scratch, 'busy-'));
    const key = secretFile('k4', 'fourth database key');
    const other = secretFile('k5', 'fifth database key');
    await session(dataDir, key, async () => {
      const r = await meshgate([
        'coordinator',
        'db',
        'rekey',
        ...db(dataDir),
        '--database-key-file',
        key,
        '--new-key-file',
        other,
      ]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /is in use; stop the coordinator first\n$/);
    });
    assert.deepEqual(await projects(dataDir, key), []);
  });
});
