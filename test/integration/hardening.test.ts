// What an attack on the coordinator found, one test per finding: callers
// that send what no client would must get a clear refusal, and nothing they
// send may stall, crash or slow the coordinator for anyone else.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { request } from 'node:https';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import Database from 'better-sqlite3-multiple-ciphers';
import { type AdminClient, connectAdmin } from '../../cli/admin-client.js';
import { encodeWgKey, generateNodeKey } from '../../proto/keys.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

function rest(
  t: TestCoordinator,
  method: 'GET' | 'POST',
  path: string,
  opts: { apiKey?: string; body?: string | Buffer } = {},
): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: '127.0.0.1',
        port: t.c.httpPort,
        method,
        path,
        ca: readFileSync(join(t.dataDir, 'tls.crt')),
        servername: 'localhost',
        headers: {
          'content-type': 'application/json',
          ...(opts.apiKey ? { authorization: `Bearer ${opts.apiKey}` } : {}),
        },
      },
      (res) => {
        let body = '';
        res.on('data', (d) => {
          body += d;
        });
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }),
        );
      },
    );
    // The server may answer (and close) before a large body is sent; the answer is what counts.
    req.on('error', (err) => ((err as NodeJS.ErrnoException).code === 'EPIPE' ? undefined : reject(err)));
    req.end(opts.body);
  });
}

const refusedWith = (code: grpc.status, re: RegExp) => (err: grpc.ServiceError) => {
  assert.equal(err.code, code, `${grpc.status[err.code]}: ${err.details}`);
  assert.match(err.details, re);
  return true;
};

/** Fails instead of hanging when a call never answers. */
function within<T>(ms: number, p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer within ${ms} ms`)), ms);
  });
  return Promise.race([p, limit]).finally(() => clearTimeout(timer));
}

async function remoteAdmin(t: TestCoordinator, apiKey: string): Promise<AdminClient> {
  return connectAdmin({ coordinator: t.url, fingerprint: t.fingerprint, apiKey, output: 'json' }, {});
}

describe('hardening: refusals at the door', () => {
  let t: TestCoordinator;
  const agents: SimAgent[] = [];
  const agent = () => {
    const a = new SimAgent(t.url, t.fingerprint);
    agents.push(a);
    return a;
  };

  before(async () => {
    t = await startTestCoordinator();
  });
  after(async () => {
    for (const a of agents) a.close();
    await t.close();
  });

  it('1: refuses a node key another node holds, at Register and at RotateNodeKey', async () => {
    const key = await authKey(t, 'keys', { reusable: true });
    const victim = agent();
    await victim.register(key, 'victim');
    await victim.connect();
    const thief = agent();
    const stolen = {
      authKey: key,
      machineKey: thief.machine.publicKey,
      nodeKey: victim.nodeKey.publicKey,
      hostname: 'thief',
      endpoints: [],
    };
    await assert.rejects(
      thief.client.register(stolen),
      refusedWith(grpc.status.ALREADY_EXISTS, /^node key is already used by another node/),
    );
    await thief.register(key, 'thief');
    // Registering again (as on every reconnect) with the stolen key is refused too.
    await assert.rejects(
      thief.client.register(stolen),
      refusedWith(grpc.status.ALREADY_EXISTS, /^node key is already used by another node/),
    );
    await assert.rejects(
      thief.client.rotateNodeKey(victim.nodeKey.publicKey),
      refusedWith(grpc.status.ALREADY_EXISTS, /^node key is already used by another node/),
    );
    // Rotating to a fresh key still works, and the victim sees the thief once, with its own key.
    const fresh = generateNodeKey();
    await thief.client.rotateNodeKey(fresh.publicKey);
    await victim.waitFor(
      () => victim.netmap?.peers.find((p) => p.id === thief.id)?.nodeKey === encodeWgKey(fresh.publicKey),
      3000,
      'the thief with its fresh key',
    );
    const keys = victim.netmap!.peers.map((p) => p.nodeKey);
    assert.equal(new Set(keys).size, keys.length);
    assert.ok(!keys.includes(encodeWgKey(victim.nodeKey.publicKey)));
  });

  it('2: refuses durations no timestamp can hold', async () => {
    await authKey(t, 'durations');
    const a = agent();
    await a.register(await authKey(t, 'durations'), 'long');
    for (const expiration of ['99999999999999999999d', '3651d', `${'9'.repeat(400)}s`]) {
      await assert.rejects(
        t.admin.call('expireNode', { id: a.id, project: 'durations', expiration, clear: false }),
        refusedWith(
          grpc.status.INVALID_ARGUMENT,
          /expiration: invalid duration .*(at most 3650d|longer than)/,
        ),
      );
    }
    await assert.rejects(
      t.admin.call('createApiKey', { expiration: '1e400d', description: '' }),
      refusedWith(grpc.status.INVALID_ARGUMENT, /invalid duration/),
    );
    const r = await t.admin.call('expireNode', {
      id: a.id,
      project: 'durations',
      expiration: '3650d',
      clear: false,
    });
    assert.ok(r.node?.expiresAt);
    assert.equal((await t.admin.call('listNodes', { project: 'durations' })).nodes.length, 1);
  });

  it('3: answers a policy that multiplies or nests too deep with INVALID_ARGUMENT, quickly', async () => {
    await t.admin.call('createProject', { name: 'policies' });
    const groups: Record<string, string[]> = {};
    for (let i = 0; i < 9; i++) groups[`group:g${i}`] = Array(10).fill(i === 8 ? 'web' : `group:g${i + 1}`);
    const ten = JSON.stringify({ groups, acls: [{ action: 'accept', src: ['group:g0'], dst: ['*:22'] }] });
    const started = Date.now();
    await t.admin.call('setPolicy', { project: 'policies', policy: ten });
    assert.ok(Date.now() - started < 2000, `took ${Date.now() - started} ms`);
    const deep = `{"acls": ${'['.repeat(10_000)}${']'.repeat(10_000)}}`;
    await assert.rejects(
      t.admin.call('checkPolicy', { project: 'policies', policy: deep }),
      refusedWith(
        grpc.status.INVALID_ARGUMENT,
        /^policy:1:\d+: syntax error: nested more than \d+ levels deep$/,
      ),
    );
  });

  it('4: refuses a huge value with a short error, and the connection keeps working', async () => {
    const started = Date.now();
    await within(
      5000,
      assert.rejects(
        t.admin.call('createProject', { name: 'x'.repeat(100_000) }),
        (err: grpc.ServiceError) => {
          assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
          assert.ok(err.details.length < 200, err.details);
          return true;
        },
      ),
      'createProject',
    );
    await within(5000, t.admin.call('listProjects', {}), 'the next call');
    // A value that passes the size bound but not the rules is quoted by a short prefix only.
    await assert.rejects(
      t.admin.call('getNode', { id: 'y'.repeat(1000), project: '' }),
      refusedWith(grpc.status.NOT_FOUND, /^no node "y{64}…"$/),
    );
    assert.ok(Date.now() - started < 5000);
  });

  it('5: answers REST errors with one JSON line, and checks the API key before the body', async () => {
    const { apiKey } = await t.admin.call('createApiKey', { expiration: '1h', description: 'rest' });
    const key = apiKey!.key;
    const json = (r: { status: number; type: string; body: string }, status: number, re: RegExp) => {
      assert.equal(r.status, status, r.body);
      assert.match(r.type, /^application\/json/);
      const body = JSON.parse(r.body) as { error: string };
      assert.match(body.error, re);
      assert.doesNotMatch(r.body, /<html|<pre|node_modules|\/work\/|at .*\.js/i);
    };
    json(
      await rest(t, 'POST', '/api/v1/CreateProject', { apiKey: key, body: '{"name": ' }),
      400,
      /not valid JSON/,
    );
    json(
      await rest(t, 'POST', '/api/v1/CreateProject', {
        apiKey: key,
        body: `{"name":"${'a'.repeat(5 << 20)}"}`,
      }),
      413,
      /larger than/,
    );
    json(await rest(t, 'GET', '/nothing-here'), 404, /no route GET "\/nothing-here"/);
    json(
      await rest(t, 'POST', '/api/v1/Nothing', { apiKey: key, body: '{}' }),
      404,
      /no admin method "Nothing"/,
    );
    json(await rest(t, 'GET', '/api/v1/nothing', { apiKey: key }), 404, /no route GET/);
    // Without a key a broken body is not even read: the answer is about the key.
    json(await rest(t, 'POST', '/api/v1/CreateProject', { body: '{"name": ' }), 401, /missing API key/);
    assert.equal((await rest(t, 'GET', '/api/v1/projects', { apiKey: key })).status, 200);
  });

  it('6: refuses terminal control and bidi characters from agents and admins', async () => {
    const key = await authKey(t, 'text', { reusable: true });
    const a = agent();
    for (const [field, value] of [
      ['hostname', 'web\u009b31m'],
      ['os', 'linux\u202e'],
      ['version', '1.0\u0085'],
    ] as const) {
      await assert.rejects(
        a.client.register({
          authKey: key,
          machineKey: a.machine.publicKey,
          nodeKey: a.nodeKey.publicKey,
          hostname: 'ok',
          os: 'linux',
          version: '1.0',
          endpoints: [],
          [field]: value,
        }),
        refusedWith(
          grpc.status.INVALID_ARGUMENT,
          new RegExp(`^${field} contains the control or bidirectional`),
        ),
      );
    }
    for (const version of ['1.0\u009b', '1.0\u2066', '1.0\u0085']) {
      await assert.rejects(
        t.admin.call('setDesiredVersion', { project: 'text', tag: '', version }),
        refusedWith(grpc.status.INVALID_ARGUMENT, /control characters/),
      );
    }
    await assert.rejects(
      t.admin.call('createApiKey', { expiration: '1h', description: 'ops\u202eyek' }),
      refusedWith(grpc.status.INVALID_ARGUMENT, /^description contains/),
    );
    await assert.rejects(
      t.admin.call('setPolicy', { project: 'text', policy: '{\n  // \u202e hidden\n}' }),
      refusedWith(
        grpc.status.INVALID_ARGUMENT,
        /^policy:2:6: syntax error: control or bidirectional character U\+202E/,
      ),
    );
  });
});

describe('hardening: a stored expiry out of range', () => {
  it('2: is read as the latest time there is; listings and netmaps keep working', async () => {
    let t = await startTestCoordinator();
    const dataDir = t.dataDir;
    const a = new SimAgent(t.url, t.fingerprint);
    try {
      await a.register(await authKey(t, 'stored'), 'far');
      t.admin.close();
      await t.c.close();
      // What older versions let `nodes expire --in 99999999999999999999d` write.
      const db = new Database(join(dataDir, 'meshgate.db'));
      db.prepare('update nodes set expires_at = ? where id = ?').run(8.64e27, a.id);
      db.close();
      t = await startTestCoordinator({ dataDir });
      const b = new SimAgent(t.url, t.fingerprint, a.machine);
      try {
        const nodes = (await t.admin.call('listNodes', { project: 'stored' })).nodes;
        assert.equal(nodes.length, 1);
        assert.equal(nodes[0]!.expired, false);
        assert.equal(new Date(Number(nodes[0]!.expiresAt!.seconds) * 1000).getUTCFullYear(), 9999);
        await b.register('', 'far');
        await b.connect();
        assert.equal(b.netmap?.self?.id, a.id);
        const again = await t.admin.call('getNode', { id: a.id, project: 'stored' });
        assert.equal(again.node?.name, 'far');
      } finally {
        b.close();
      }
    } finally {
      a.close();
      await t.close();
    }
  });
});

describe('hardening: failed authentication is throttled per address', () => {
  let t: TestCoordinator;
  before(async () => {
    t = await startTestCoordinator({ authFailureRate: { perSecond: 0.001, burst: 6 } });
  });
  after(async () => t.close());

  it('7: counts failures of every API against one budget; successes spend none', async () => {
    const { apiKey } = await t.admin.call('createApiKey', { expiration: '1h', description: 'ok' });
    const good = await remoteAdmin(t, apiKey!.key);
    const bad = await remoteAdmin(t, `mgkey_api_000000000000_${'A'.repeat(43)}`);
    const gone = new SimAgent(t.url, t.fingerprint);
    try {
      // Many successful calls first: they must not spend the budget.
      for (let i = 0; i < 20; i++) await good.call('listProjects', {});
      await gone.register(await authKey(t, 'throttle'), 'gone');
      await t.admin.call('deleteNode', { id: gone.id, project: 'throttle' });

      const unauthenticated = refusedWith(grpc.status.UNAUTHENTICATED, /./);
      for (let i = 0; i < 2; i++) {
        await assert.rejects(bad.call('listProjects', {}), unauthenticated);
        assert.equal((await rest(t, 'GET', '/api/v1/projects', { apiKey: 'wrong' })).status, 401);
        await assert.rejects(gone.client.logout(), unauthenticated);
      }
      const held = /too many failed authentications from this address/;
      await assert.rejects(bad.call('listProjects', {}), refusedWith(grpc.status.RESOURCE_EXHAUSTED, held));
      await assert.rejects(good.call('listProjects', {}), refusedWith(grpc.status.RESOURCE_EXHAUSTED, held));
      const r = await rest(t, 'GET', '/api/v1/projects', { apiKey: apiKey!.key });
      assert.equal(r.status, 429);
      assert.match(r.body, held);
      await assert.rejects(gone.client.logout(), refusedWith(grpc.status.RESOURCE_EXHAUSTED, held));
      // The local socket needs no key and is never held.
      await t.admin.call('listProjects', {});

      const refusals = t.logs.filter((l) => l.includes('"msg":"refused call"')).map((l) => JSON.parse(l));
      for (const api of ['admin', 'rest', 'control'])
        assert.ok(
          refusals.some((l) => l.api === api && l.peer === '127.0.0.1'),
          `${api} refusals logged with the address`,
        );
      for (const l of refusals) assert.equal(l.peer, '127.0.0.1', 'the address without a port');
      const metrics = (await rest(t, 'GET', '/metrics')).body;
      for (const api of ['admin', 'rest', 'control']) {
        assert.match(metrics, new RegExp(`meshgate_auth_failures_total\\{api="${api}"\\} 2`));
        assert.match(metrics, new RegExp(`meshgate_auth_throttled_total\\{api="${api}"\\} [1-9]`));
      }
    } finally {
      good.close();
      bad.close();
      gone.close();
    }
  });
});
