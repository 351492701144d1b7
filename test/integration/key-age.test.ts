// A project's maximum node key age: nodes whose key is older leave their
// peers' netmaps, stay connected, and come back as soon as they rotate.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { request } from 'node:https';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { connectAdmin } from '../../cli/admin-client.js';
import { encodeWgKey, generateNodeKey } from '../../proto/keys.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

function post(
  t: TestCoordinator,
  path: string,
  apiKey: string,
  body: object,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: '127.0.0.1',
        port: t.c.httpPort,
        method: 'POST',
        path,
        ca: readFileSync(join(t.dataDir, 'tls.crt')),
        servername: 'localhost',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${apiKey}` },
      },
      (res) => {
        let text = '';
        res.on('data', (d) => {
          text += d;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      },
    );
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

describe('maximum node key age', () => {
  let t: TestCoordinator;
  const agents: SimAgent[] = [];
  before(async () => {
    // A short ephemeral timeout makes the lifecycle sweep run every few hundred milliseconds.
    t = await startTestCoordinator({ ephemeralTimeout: '1s' });
  });
  after(async () => {
    for (const a of agents) a.close();
    await t.close();
  });

  it('cuts nodes with old keys off the mesh until they rotate, set over REST and audited', async () => {
    const key = await authKey(t, 'aged', { reusable: true });
    const a = new SimAgent(t.url, t.fingerprint);
    const b = new SimAgent(t.url, t.fingerprint);
    agents.push(a, b);
    for (const [n, s] of [
      [a, 'a'],
      [b, 'b'],
    ] as const) {
      await n.register(key, s);
      await n.connect();
    }
    await a.waitFor(() => a.peerIds().includes(b.id), 3000, 'b in a netmap');

    const { apiKey } = await t.admin.call('createApiKey', { expiration: '1h', description: 'ops' });
    const res = await post(t, '/api/v1/SetProjectMaxKeyAge', apiKey!.key, {
      project: 'aged',
      maxKeyAge: '2s',
    });
    assert.equal(res.status, 200, res.body);
    assert.equal(JSON.parse(res.body).project.maxKeyAgeSeconds, 2);

    // Both keys are older than 2 s soon: each drops out of the other's netmap.
    await a.waitFor(() => !a.peerIds().includes(b.id), 5000, 'b gone from a netmap');
    await b.waitFor(() => !b.peerIds().includes(a.id), 5000, 'a gone from b netmap');
    const listed = (await t.admin.call('listNodes', { project: 'aged' })).nodes;
    assert.deepEqual(
      listed.map((n) => [n.name, n.keyExpired, n.expired]),
      [
        ['a', true, false],
        ['b', true, false],
      ],
    );
    assert.equal(a.ended, null, 'a node with an old key stays connected, so that it can rotate');

    const freshA = generateNodeKey();
    const freshB = generateNodeKey();
    await a.client.rotateNodeKey(freshA.publicKey);
    await b.client.rotateNodeKey(freshB.publicKey);
    await a.waitFor(
      () => a.netmap?.peers.find((p) => p.id === b.id)?.nodeKey === encodeWgKey(freshB.publicKey),
      3000,
      'b back in a netmap with its new key',
    );
    const node = (await t.admin.call('getNode', { id: b.id, project: 'aged' })).node!;
    assert.equal(node.keyExpired, false);
    assert.ok(Number(node.keySetAt!.seconds) * 1000 > Date.now() - 5000);

    const entries = (await t.admin.call('listAuditEntries', { project: 'aged' })).entries;
    const set = entries.find((e) => e.action === 'project.max-key-age');
    assert.ok(set, 'the change is audited');
    assert.deepEqual(JSON.parse(set.detail), { maxKeyAgeMs: 2000 });

    const off = await t.admin.call('setProjectMaxKeyAge', { project: 'aged', maxKeyAge: 'off' });
    assert.equal(off.project!.maxKeyAgeSeconds, 0);
  });

  it('refuses nonsense and keys scoped to the project', async () => {
    await authKey(t, 'tenant');
    await assert.rejects(
      t.admin.call('setProjectMaxKeyAge', { project: 'tenant', maxKeyAge: '500ms' }),
      (err: grpc.ServiceError) =>
        err.code === grpc.status.INVALID_ARGUMENT && /at least 1s/.test(err.details),
    );
    await assert.rejects(
      t.admin.call('setProjectMaxKeyAge', { project: 'tenant', maxKeyAge: '99999d' }),
      (err: grpc.ServiceError) =>
        err.code === grpc.status.INVALID_ARGUMENT && /at most 3650d/.test(err.details),
    );
    const { apiKey } = await t.admin.call('createApiKey', {
      expiration: '1h',
      description: 'tenant',
      projects: ['tenant'],
    });
    const scoped = await connectAdmin({
      coordinator: t.url,
      apiKey: apiKey!.key,
      fingerprint: t.fingerprint,
      output: 'json',
    });
    try {
      await assert.rejects(
        scoped.call('setProjectMaxKeyAge', { project: 'tenant', maxKeyAge: 'off' }),
        (err: grpc.ServiceError) => err.code === grpc.status.PERMISSION_DENIED,
      );
    } finally {
      scoped.close();
    }
  });
});
