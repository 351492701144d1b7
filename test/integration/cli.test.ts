// The README's first steps, through the real `meshgate` command: start the
// coordinator, make an API key over the local socket, then a project and an
// auth key from "another shell" with the pinned fingerprint.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseSecret } from '../../coordinator/state/secrets.js';
import { SimAgent } from './harness.js';
import { meshgate, type Started, startCoordinator, stop } from './process.js';

function https(
  dataDir: string,
  port: number,
  path: string,
  apiKey?: string,
  body?: object,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: '127.0.0.1',
        port,
        path,
        method: body ? 'POST' : 'GET',
        ca: readFileSync(join(dataDir, 'tls.crt')),
        servername: 'localhost',
        headers: {
          ...(apiKey ? { authorization: `Bearer ${apiKey}` } : {}),
          ...(body ? { 'content-type': 'application/json' } : {}),
        },
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
    req.end(body ? JSON.stringify(body) : undefined);
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
    assert.match(k.key, /^mgkey_api_[0-9a-f]{12}_/);
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
    assert.equal(parseSecret('auth', ak.key)?.id, ak.id, 'the key carries its id');
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
    assert.match(vpn.stdout, /^mgkey_auth_[0-9a-f]{12}_[A-Za-z0-9]{43}\n$/, 'vpn key prints the key alone');

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

  it('prints a new API key alone on the last line, as scripts written for Headscale expect', async () => {
    const created = await meshgate([
      'apikeys',
      'create',
      '-e',
      '365d',
      '--socket',
      join(dataDir, 'admin.sock'),
    ]);
    assert.equal(created.code, 0, created.stderr);
    const lines = created.stdout.trimEnd().split('\n');
    assert.match(lines.at(-1)!, /^mgkey_api_[0-9a-f]{12}_[A-Za-z0-9]{43}$/);
    const listed = await meshgate(['apikeys', 'list', '-o', 'json', '--socket', join(dataDir, 'admin.sock')]);
    const key = JSON.parse(listed.stdout).find((k: { id: string }) => lines.at(-1)!.includes(k.id));
    const days = (Date.parse(key.expiresAt) - Date.parse(key.createdAt)) / 86_400_000;
    assert.equal(Math.round(days), 365, '-e is --expiration');
  });

  it('answers bad input with one line and a non-zero exit', async () => {
    const remote = ['--coordinator', `grpcs://127.0.0.1:${c.grpcPort}`];
    const wrongKey = await meshgate(['projects', 'list', ...remote, '--fingerprint', c.fingerprint], {
      MESHGATE_API_KEY: `mgkey_api_000000000000_${'x'.repeat(43)}`,
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
    assert.match(metrics.body, /^meshgate_stream_unsent_bytes\{kind="delta"\} \d+$/m);
    assert.match(metrics.body, /^meshgate_stream_unsent_bytes\{kind="full"\} \d+$/m);
    assert.match(metrics.body, /^meshgate_registrations_total\{result="new"\} 1$/m);
    assert.match(metrics.body, /^meshgate_api_key_expiry_seconds\{id="[0-9a-f]{12}"\} \d+$/m);
    assert.match(metrics.body, /^meshgate_process_cpu_seconds_total \S+$/m);
    assert.match(metrics.body, /^meshgate_nodejs_heap_size_used_bytes \S+$/m);
    assert.doesNotMatch(metrics.body, /meshgate_process_(process|nodejs)_/, 'no doubled words in names');
    assert.equal((await https(dataDir, c.httpPort, '/api/v1/projects')).status, 401);
    const rest = await https(dataDir, c.httpPort, '/api/v1/projects', apiKey);
    assert.equal(rest.status, 200);
    assert.deepEqual(
      JSON.parse(rest.body).projects.map((p: { name: string }) => p.name),
      ['demo'],
    );
  });

  it('refuses a policy whose tests fail or that cuts SSH to a locked-down node, unless forced', async () => {
    const socket = ['--socket', join(dataDir, 'admin.sock')];
    const project = ['--project', 'locked', ...socket];
    assert.equal((await meshgate(['projects', 'create', 'locked', ...socket])).code, 0);
    const key = JSON.parse(
      (await meshgate(['keys', 'create', '--reusable', '-o', 'json', ...project])).stdout,
    ).key;
    const url = `grpcs://127.0.0.1:${c.grpcPort}`;
    const fw = new SimAgent(url, c.fingerprint);
    const ops = new SimAgent(url, c.fingerprint);
    await fw.register(key, 'fw');
    await ops.register(key, 'ops');
    await fw.connect([22]);
    await ops.connect();
    const deadline = Date.now() + 10_000;
    for (;;) {
      const nodes = JSON.parse((await meshgate(['nodes', 'list', '-o', 'json', ...project])).stdout);
      if (nodes.find((n: { name: string }) => n.name === 'fw')?.lockdownPorts?.[0] === 22) break;
      assert.ok(Date.now() < deadline, 'the coordinator learns that fw is locked down');
    }
    const file = join(dataDir, 'policy.hujson');
    const set = async (policy: string, ...extra: string[]) => {
      writeFileSync(file, policy);
      return meshgate(['policy', 'set', file, ...project, ...extra]);
    };

    const failing = await set(`{
      "acls": [{ "action": "accept", "src": ["ops"], "dst": ["fw:22"] }],
      "tests": [{ "src": "ops", "deny": ["fw:22"] }],
    }`);
    assert.equal(failing.code, 1);
    assert.equal(
      failing.stderr,
      'meshgate: policy not set: 1 of its tests fails: deny fw:22 from ops: expected deny, got accept; fix it, or set it anyway with --force\n',
    );
    const none = await meshgate(['policy', 'get', ...project]);
    assert.equal(none.code, 0);
    assert.equal(none.stdout, '', 'no policy: nothing on stdout');
    assert.equal(
      none.stderr,
      'project locked has no policy: every node of the project reaches every other\n',
    );

    const empty = await set('{"acls":[]}');
    assert.equal(empty.code, 1);
    assert.equal(
      empty.stderr,
      'meshgate: policy not set: it leaves no path from any other node of the project to locked-down fw (tcp 22); fix it, or set it anyway with --force\n',
    );
    const rest = await https(dataDir, c.httpPort, '/api/v1/SetPolicy', apiKey, {
      project: 'locked',
      policy: '{"acls":[]}',
    });
    assert.equal(rest.status, 412, rest.body);
    assert.match(
      JSON.parse(rest.body).error,
      /^policy not set: it leaves no path .* locked-down fw \(tcp 22\)/,
    );

    const keepsSsh = await set('{"acls":[{ "action": "accept", "src": ["ops"], "dst": ["fw:22"] }]}');
    assert.equal(keepsSsh.code, 0, keepsSsh.stderr);
    const forced = await set('{"acls":[]}', '--force');
    assert.equal(forced.code, 0, forced.stderr);
    assert.equal(forced.stderr, 'policy of locked updated\n');

    // What `policy get` prints sets the same policy again, and so does "no policy".
    const got = await meshgate(['policy', 'get', ...project]);
    assert.equal(got.stdout, '{"acls":[]}\n');
    assert.equal((await set(got.stdout)).code, 0, 'a policy that cuts nothing new needs no --force');
    assert.equal((await set('')).code, 0);
    assert.equal((await set((await meshgate(['policy', 'get', ...project])).stdout)).code, 0);
    assert.equal((await meshgate(['policy', 'get', ...project])).stdout, '');
    fw.close();
    ops.close();

    const { default: Database } = await import('better-sqlite3-multiple-ciphers');
    const db = new Database(join(dataDir, 'meshgate.db'), { readonly: true });
    const rows = db
      .prepare("select detail from audit_log where action = 'policy.set' and target = 'locked'")
      .all() as { detail: string }[];
    db.close();
    assert.deepEqual(
      rows.map((r) => JSON.parse(r.detail)),
      [
        {},
        {
          force: true,
          failedTests: [],
          cut: ['fw (tcp 22)'],
        },
        {},
      ],
    );
  });

  it('says HTTPS for its HTTPS listener', () => {
    assert.match(c.banner, new RegExp(`^  HTTPS         127\\.0\\.0\\.1:${c.httpPort}$`, 'm'));
  });

  it('keeps a second coordinator off its data dir and goes on serving', async () => {
    const second = await meshgate([
      'coordinator',
      '--data-dir',
      dataDir,
      '--grpc-listen',
      '127.0.0.1:0',
      '--http-listen',
      '127.0.0.1:0',
    ]);
    assert.equal(second.code, 1);
    assert.equal(
      second.stderr,
      `meshgate: another coordinator (PID ${c.proc.pid}) is running with data dir ${dataDir}; stop it first, or give this one its own --data-dir\n`,
    );
    assert.equal(second.stdout, '');
    const listed = await meshgate([
      'projects',
      'list',
      '-o',
      'json',
      '--socket',
      join(dataDir, 'admin.sock'),
    ]);
    assert.equal(listed.code, 0, `the first one's admin socket still answers: ${listed.stderr}`);
    const remote = await meshgate(
      [
        'projects',
        'list',
        '--coordinator',
        `grpcs://127.0.0.1:${c.grpcPort}`,
        '--fingerprint',
        c.fingerprint,
      ],
      env,
    );
    assert.equal(remote.code, 0, remote.stderr);
  });

  it('explains connection and start-up mistakes in one line', async () => {
    const at = `127.0.0.1:${c.grpcPort}`;
    const noEnv = { MESHGATE_COORDINATOR: '', MESHGATE_FINGERPRINT: '' };
    const lines: [string, string[], string][] = [
      [
        'agent without --coordinator',
        ['agent', '--auth-key-file', join(dataDir, 'nokey')],
        'meshgate: no coordinator given: pass --coordinator grpcs://HOST:PORT, set MESHGATE_COORDINATOR, or put coordinator: in the --config file\n',
      ],
      [
        'self-signed certificate without --fingerprint',
        ['projects', 'list', '--coordinator', `grpcs://${at}`],
        `meshgate: coordinator at ${at} has a self-signed certificate: pin its key with --fingerprint sha256:… (or MESHGATE_FINGERPRINT): the coordinator prints it when it starts, and "meshgate coordinator fingerprint" prints it on its host\n`,
      ],
      [
        'grpc:// against the TLS port',
        ['projects', 'list', '--coordinator', `grpc://${at}`],
        `meshgate: coordinator at ${at} speaks TLS: use grpcs://${at} with --fingerprint (grpc:// is for a coordinator started with --plaintext)\n`,
      ],
      [
        'a data dir that cannot be made',
        ['coordinator', '--data-dir', '/dev/null/data'],
        'meshgate: cannot create data dir /dev/null/data: ENOTDIR\n',
      ],
      [
        'status without an agent',
        ['status', '--socket', join(dataDir, 'agent.sock')],
        `meshgate: no agent is running (no socket at ${join(dataDir, 'agent.sock')}); start one with "meshgate agent"\n`,
      ],
    ];
    for (const [what, args, line] of lines) {
      const r = await meshgate(args, { ...env, ...noEnv });
      assert.equal(r.code, 1, what);
      assert.equal(r.stderr, line, what);
    }

    const plaintext = createServer((s) => s.end('HTTP/1.1 400 Bad Request\r\n\r\n'));
    await new Promise<void>((r) => plaintext.listen(0, '127.0.0.1', r));
    const plainAt = `127.0.0.1:${(plaintext.address() as { port: number }).port}`;
    try {
      for (const pin of [[], ['--fingerprint', c.fingerprint]]) {
        const r = await meshgate(['projects', 'list', '--coordinator', `grpcs://${plainAt}`, ...pin], env);
        assert.equal(r.code, 1);
        assert.equal(
          r.stderr,
          `meshgate: coordinator at ${plainAt} does not speak TLS: use grpc://${plainAt} if it was started with --plaintext\n`,
        );
      }
    } finally {
      plaintext.close();
    }

    const otherDir = mkdtempSync(join(tmpdir(), 'meshgate-cli-'));
    try {
      for (const [flag, taken] of [
        ['--grpc-listen', c.grpcPort],
        ['--http-listen', c.httpPort],
      ] as const) {
        const free = flag === '--grpc-listen' ? '--http-listen' : '--grpc-listen';
        const r = await meshgate([
          'coordinator',
          '--data-dir',
          otherDir,
          flag,
          `127.0.0.1:${taken}`,
          free,
          '127.0.0.1:0',
          '--log-level',
          'warn',
        ]);
        assert.equal(r.code, 1, 'exits, does not hang');
        assert.equal(
          r.stderr,
          `meshgate: cannot listen on 127.0.0.1:${taken}: the port is in use; stop what listens there or choose another with ${flag}\n`,
        );
      }
    } finally {
      rmSync(otherDir, { recursive: true, force: true });
    }
  });

  it('makes a scoped read-only key and lists the audit log', async () => {
    const socket = ['--socket', join(dataDir, 'admin.sock')];
    const created = await meshgate([
      'apikeys',
      'create',
      '--project',
      'demo',
      '--read-only',
      '--description',
      'monitoring',
      '-o',
      'json',
      ...socket,
    ]);
    assert.equal(created.code, 0, created.stderr);
    const k = JSON.parse(created.stdout);
    assert.deepEqual([k.projects, k.readOnly], [['demo'], true]);
    const listed = await meshgate(['apikeys', 'list', ...socket]);
    assert.match(listed.stdout, new RegExp(`${k.id}.*\\sdemo\\s+read-only`));

    const remote = ['--coordinator', `grpcs://127.0.0.1:${c.grpcPort}`, '--fingerprint', c.fingerprint];
    const scopedEnv = { MESHGATE_API_KEY: k.key };
    const refused = await meshgate(['projects', 'create', 'other', ...remote], scopedEnv);
    assert.equal(refused.code, 1);
    assert.equal(refused.stderr, 'meshgate: this API key is read-only\n');

    const all = JSON.parse((await meshgate(['audit', 'list', '-o', 'json', ...socket])).stdout);
    assert.ok(all.some((e: { action: string }) => e.action === 'apikey.create'));
    const audit = await meshgate(['audit', 'list', '--since', '1h', '-o', 'json', ...remote], scopedEnv);
    assert.equal(audit.code, 0, audit.stderr);
    const entries = JSON.parse(audit.stdout) as {
      project: string;
      action: string;
      actor: string;
      detail: object;
    }[];
    assert.ok(entries.length >= 3, 'project.create, authkey.create twice');
    assert.ok(
      entries.every((e) => e.project === 'demo'),
      'a scoped key sees only its projects',
    );
    const create = entries.find((e) => e.action === 'authkey.create')!;
    assert.match(create.actor, /^apikey:[0-9a-f]{12}$/);
    assert.equal((create.detail as { project: string }).project, 'demo');
    const last = JSON.parse(
      (await meshgate(['audit', 'list', '--limit', '1', '-o', 'json', ...socket])).stdout,
    );
    assert.equal(last.length, 1);
    assert.equal(last[0].action, 'apikey.create', 'the newest entry');
    const table = await meshgate(['audit', 'list', '--project', 'demo', ...socket]);
    assert.match(table.stdout.split('\n')[0]!, /^TIME\s+ACTOR\s+ACTION\s+PROJECT\s+TARGET$/);
    assert.match(table.stdout, /apikey:[0-9a-f]{12}\s+project\.create\s+demo\s+demo/);
    const none = await meshgate(['audit', 'list', '--since', '1ms', '-o', 'json', ...socket]);
    assert.deepEqual(JSON.parse(none.stdout), []);
  });

  it('writes every admin mutation to the audit log with its actor', async () => {
    const { default: Database } = await import('better-sqlite3-multiple-ciphers');
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
