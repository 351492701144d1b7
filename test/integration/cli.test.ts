// The README's first steps, through the real `meshgate` command: start the
// coordinator, make an API key over the local socket, then a project and an
// auth key from "another shell" with the pinned fingerprint.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { SimAgent } from './harness.js';
import { meshgate, type Started, startCoordinator, stop } from './process.js';

function https(
  dataDir: string,
  port: number,
  path: string,
  apiKey?: string,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: '127.0.0.1',
        port,
        path,
        ca: readFileSync(join(dataDir, 'tls.crt')),
        servername: 'localhost',
        headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {},
      },
      (res) => {
        let body = '';
        res.on('data', (d) => {
          body += d;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      },
    );
    req.on('error', reject);
    req.end();
  });
}

describe('meshgate CLI against a coordinator process', () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'meshgate-cli-'));
  let c: Started;
  let apiKey = '';
  let env: Record<string, string>;

  before(async () => {
    c = await startCoordinator(dataDir);
  });
  after(async () => {
    await stop(c.proc);
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('creates an API key over the local socket and uses it remotely with the pinned fingerprint', async () => {
    const fp = await meshgate(['coordinator', 'fingerprint', '--data-dir', dataDir]);
    assert.equal(fp.stdout.trim(), c.fingerprint);

    const created = await meshgate([
      'apikeys',
      'create',
      '--socket',
      join(dataDir, 'admin.sock'),
      '-o',
      'json',
    ]);
    assert.equal(created.code, 0, created.stderr);
    const k = JSON.parse(created.stdout);
    assert.match(k.key, /^mgkey-api-[0-9a-f]{12}-/);
    assert.ok(k.id && k.expiresAt);
    apiKey = k.key;
    env = { MESHGATE_API_KEY: apiKey };
    const remote = ['--coordinator', `grpcs://127.0.0.1:${c.grpcPort}`, '--fingerprint', c.fingerprint];

    const project = await meshgate(['projects', 'create', 'demo', ...remote], env);
    assert.equal(project.code, 0, project.stderr);
    const key = await meshgate(
      [
        'keys',
        'create',
        '--project',
        'demo',
        '--ephemeral',
        '--tags',
        'tag:ops',
        '--expiration',
        '2h',
        '-o',
        'json',
        ...remote,
      ],
      env,
    );
    assert.equal(key.code, 0, key.stderr);
    const ak = JSON.parse(key.stdout);
    assert.ok(ak.key.startsWith(`mgkey-auth-${ak.id}-`), 'the key carries its id');
    assert.equal(ak.project, 'demo');
    assert.equal(ak.ephemeral, true);
    assert.equal(ak.reusable, false);
    const expiresIn = Date.parse(ak.expiresAt) - Date.now();
    assert.ok(
      expiresIn > 2 * 3_600_000 - 60_000 && expiresIn <= 2 * 3_600_000,
      `expires in 2h: ${ak.expiresAt}`,
    );

    const vpn = await meshgate(
      ['vpn', 'key', '--project', 'demo', '--ephemeral', '--expiration', '1h', ...remote],
      env,
    );
    assert.match(vpn.stdout, /^mgkey-auth-[0-9a-f]{12}-[A-Za-z0-9_-]{43}\n$/, 'vpn key prints the key alone');

    const nodes = await meshgate(['nodes', 'list', '-o', 'json', ...remote], env);
    assert.equal(nodes.code, 0, nodes.stderr);
    assert.deepEqual(JSON.parse(nodes.stdout), []);

    const agent = new SimAgent(`grpcs://127.0.0.1:${c.grpcPort}`, c.fingerprint);
    const registered = Date.now();
    const reg = await agent.register(ak.key, 'laptop');
    agent.close();
    const listed = JSON.parse((await meshgate(['nodes', 'list', '-o', 'json', ...remote], env)).stdout);
    assert.equal(listed.length, 1);
    const { id, name, project: p, ipAddresses, online, version, tags, ephemeral, lastSeen } = listed[0];
    assert.deepEqual(
      { id, name, project: p, ipAddresses, online, version, tags, ephemeral },
      {
        id: reg.node!.id,
        name: 'laptop',
        project: 'demo',
        ipAddresses: reg.node!.ipAddresses,
        online: false,
        version: '0.1.0',
        tags: ['tag:ops'],
        ephemeral: true,
      },
    );
    assert.ok(Math.abs(Date.parse(lastSeen) - registered) < 60_000, `last seen at registration: ${lastSeen}`);
    const table = await meshgate(['nodes', 'list', ...remote], env);
    assert.match(table.stdout.split('\n')[0]!, /^ID\s+NAME\s+PROJECT\s+IP\s+ONLINE/);
    assert.match(table.stdout, /laptop\s+demo\s+100\.64\./);
  });

  it('answers bad input with one line and a non-zero exit', async () => {
    const remote = ['--coordinator', `grpcs://127.0.0.1:${c.grpcPort}`];
    const wrongKey = await meshgate(['projects', 'list', ...remote, '--fingerprint', c.fingerprint], {
      MESHGATE_API_KEY: `mgkey-api-000000000000-${'x'.repeat(43)}`,
    });
    assert.equal(wrongKey.code, 1);
    assert.equal(wrongKey.stderr, 'meshgate: unknown API key\n');
    const wrongPin = await meshgate(
      ['projects', 'list', ...remote, '--fingerprint', `sha256:${'0'.repeat(64)}`],
      env,
    );
    assert.equal(wrongPin.code, 1);
    assert.match(
      wrongPin.stderr,
      /^meshgate: fingerprint mismatch for 127\.0\.0\.1:\d+: expected sha256:0+, server has sha256:[0-9a-f]{64}\n$/,
    );
    const down = await meshgate(
      ['projects', 'list', '--coordinator', 'grpcs://127.0.0.1:1', '--fingerprint', c.fingerprint],
      env,
    );
    assert.equal(down.code, 1);
    assert.match(down.stderr, /^meshgate: cannot reach coordinator at 127\.0\.0\.1:1: ECONNREFUSED\n$/);
    const badDuration = await meshgate([
      'keys',
      'create',
      '--project',
      'demo',
      '--expiration',
      'soon',
      '--socket',
      join(dataDir, 'admin.sock'),
    ]);
    assert.equal(badDuration.code, 1);
    assert.match(badDuration.stderr, /^meshgate: expiration: invalid duration "soon"/);
    assert.equal(badDuration.stderr.split('\n').length, 2, 'one line');
  });

  it('serves health, readiness, metrics and the REST mirror with API-key auth', async () => {
    assert.equal((await https(dataDir, c.httpPort, '/healthz')).status, 200);
    assert.equal((await https(dataDir, c.httpPort, '/readyz')).status, 200);
    const metrics = await https(dataDir, c.httpPort, '/metrics');
    assert.match(metrics.body, /^meshgate_nodes_online \d+$/m);
    assert.match(metrics.body, /^meshgate_registrations_total\{result="new"\} 1$/m);
    assert.match(metrics.body, /^meshgate_api_key_expiry_seconds\{id="[0-9a-f]{12}"\} \d+$/m);
    assert.equal((await https(dataDir, c.httpPort, '/api/v1/projects')).status, 401);
    const rest = await https(dataDir, c.httpPort, '/api/v1/projects', apiKey);
    assert.equal(rest.status, 200);
    assert.deepEqual(
      JSON.parse(rest.body).projects.map((p: { name: string }) => p.name),
      ['demo'],
    );
  });

  it('writes every admin mutation to the audit log with its actor', async () => {
    const { default: Database } = await import('better-sqlite3');
    const db = new Database(join(dataDir, 'meshgate.db'), { readonly: true });
    const rows = db.prepare('select actor, action from audit_log order by id').all() as {
      actor: string;
      action: string;
    }[];
    db.close();
    assert.equal(rows[0]!.actor, 'local-socket');
    assert.equal(rows[0]!.action, 'apikey.create');
    assert.ok(rows.some((r) => r.action === 'project.create' && /^apikey:[0-9a-f]{12}$/.test(r.actor)));
  });
});
