// Scoped and read-only API keys against every admin method, over gRPC and
// over the REST mirror: a key limited to project alpha sees and changes
// alpha only, the other projects look as if they did not exist, and
// projects and API keys themselves are refused.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { request } from 'node:https';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { toJson } from '@bufbuild/protobuf';
import type * as grpc from '@grpc/grpc-js';
import { connectAdmin } from '../../cli/admin-client.js';
import { AdminService } from '../../proto/gen/meshgate/v1/admin_pb.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

type Outcome = { ok: true; body: Record<string, unknown> } | { ok: false; code: string; message: string };
type Call = (key: string, method: string, req: Record<string, unknown>) => Promise<Outcome>;

const GRPC_CODES: Record<number, string> = {
  3: 'INVALID_ARGUMENT',
  5: 'NOT_FOUND',
  7: 'PERMISSION_DENIED',
  9: 'FAILED_PRECONDITION',
  16: 'UNAUTHENTICATED',
};
const HTTP_CODES: Record<number, string> = {
  400: 'INVALID_ARGUMENT',
  404: 'NOT_FOUND',
  403: 'PERMISSION_DENIED',
  412: 'FAILED_PRECONDITION',
  401: 'UNAUTHENTICATED',
};
const lower = (name: string) => name[0]!.toLowerCase() + name.slice(1);

describe('scoped API keys', () => {
  let t: TestCoordinator;
  const agents: SimAgent[] = [];
  const keys = { global: '', scoped: '', readOnly: '', globalReadOnly: '', other: '' };
  const ids = { alphaNode: '', betaNode: '', betaAuthKey: '', otherApiKey: '' };

  const grpcCall: Call = async (key, method, req) => {
    const client = await connectAdmin({
      coordinator: t.url,
      apiKey: key,
      fingerprint: t.fingerprint,
      output: 'json',
    });
    try {
      const m = AdminService.methods.find((x) => x.name === method)!;
      const res = await client.call(lower(method) as never, req as never);
      return {
        ok: true,
        body: toJson(m.output, res as never, { alwaysEmitImplicit: true }) as Record<string, unknown>,
      };
    } catch (err) {
      const e = err as grpc.ServiceError;
      return { ok: false, code: GRPC_CODES[e.code] ?? String(e.code), message: e.details };
    } finally {
      client.close();
    }
  };

  const restCall: Call = (key, method, req) => rest(key, 'POST', `/api/v1/${method}`, req);

  const rest = (
    key: string,
    verb: 'GET' | 'POST',
    path: string,
    req: Record<string, unknown> = {},
  ): Promise<Outcome> =>
    new Promise((resolve, reject) => {
      const body = JSON.stringify(req);
      const r = request(
        {
          host: '127.0.0.1',
          port: t.c.httpPort,
          path,
          method: verb,
          ca: readFileSync(join(t.dataDir, 'tls.crt')),
          servername: 'localhost',
          headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
        },
        (res) => {
          let text = '';
          res.on('data', (d) => {
            text += d;
          });
          res.on('end', () => {
            const parsed = JSON.parse(text) as Record<string, unknown>;
            if (res.statusCode === 200) resolve({ ok: true, body: parsed });
            else
              resolve({
                ok: false,
                code: HTTP_CODES[res.statusCode ?? 0] ?? String(res.statusCode),
                message: String(parsed.error),
              });
          });
        },
      );
      r.on('error', reject);
      r.end(verb === 'POST' ? body : undefined);
    });

  before(async () => {
    t = await startTestCoordinator();
    const a = new SimAgent(t.url, t.fingerprint);
    const b = new SimAgent(t.url, t.fingerprint);
    agents.push(a, b);
    ids.alphaNode = (await a.register(await authKey(t, 'alpha'), 'web')).node!.id;
    // The same name in beta: a scoped key must resolve "web" to alpha's node without --project.
    ids.betaNode = (await b.register(await authKey(t, 'beta'), 'web')).node!.id;
    await a.connect();
    await b.connect();
    await a.waitFor(() => t.c.state.onlineCount() === 2, 5000, 'both nodes online');
    await t.admin.call('createProject', { name: 'gamma' });
    ids.betaAuthKey = (await t.admin.call('createAuthKey', { project: 'beta', expiration: '1h' }))
      .authKey!.id;
    await t.admin.call('setDesiredVersion', {
      project: 'alpha',
      tag: '',
      version: '1.0.0',
      artifactUrl: 'https://releases.example/meshgate.mjs',
      sha256: 'a'.repeat(64),
    });
    await t.admin.call('setDesiredVersion', {
      project: 'beta',
      tag: '',
      version: '1.0.0',
      artifactUrl: 'https://releases.example/meshgate.mjs',
      sha256: 'a'.repeat(64),
    });
    const make = async (projects: string[], readOnly: boolean) =>
      (await t.admin.call('createApiKey', { projects, readOnly, expiration: '1h' })).apiKey!;
    keys.global = (await make([], false)).key;
    const scoped = await make(['alpha'], false);
    assert.deepEqual(scoped.projects, ['alpha']);
    keys.scoped = scoped.key;
    keys.readOnly = (await make(['alpha'], true)).key;
    keys.globalReadOnly = (await make([], true)).key;
    const other = await make([], false);
    keys.other = other.key;
    ids.otherApiKey = other.id;
  });
  after(async () => {
    for (const a of agents) a.close();
    await t.close();
  });

  it('refuses to scope a key to a project that does not exist', async () => {
    await assert.rejects(t.admin.call('createApiKey', { projects: ['nope'] }), (e: grpc.ServiceError) => {
      assert.equal(e.code, 5);
      assert.match(e.details, /project "nope" does not exist/);
      return true;
    });
  });

  it('REST GET shortcuts answer within the scope too', async () => {
    const nodes = await rest(keys.scoped, 'GET', '/api/v1/nodes');
    assert.ok(nodes.ok);
    assert.deepEqual(
      (nodes.body.nodes as { project: string }[]).map((n) => n.project),
      ['alpha'],
    );
    const audit = await rest(keys.scoped, 'GET', '/api/v1/audit?since=1h&limit=2');
    assert.ok(audit.ok);
    const entries = audit.body.entries as { project: string }[];
    assert.equal(entries.length, 2);
    assert.ok(entries.every((e) => e.project === 'alpha'));
    const other = await rest(keys.scoped, 'GET', '/api/v1/audit?project=beta');
    assert.deepEqual(other.ok ? null : other.code, 'NOT_FOUND');
    const keysList = await rest(keys.scoped, 'GET', '/api/v1/apikeys');
    assert.deepEqual(keysList.ok ? null : keysList.code, 'PERMISSION_DENIED');
  });

  it('a rotated key keeps its scope', async () => {
    const made = (await t.admin.call('createApiKey', { projects: ['beta', 'alpha'], readOnly: true }))
      .apiKey!;
    assert.deepEqual(made.projects, ['alpha', 'beta']);
    const rotated = (await t.admin.call('rotateApiKey', { id: made.id })).apiKey!;
    assert.deepEqual([rotated.projects, rotated.readOnly], [['alpha', 'beta'], true]);
    const r = await grpcCall(rotated.key, 'ListProjects', {});
    assert.ok(r.ok);
    assert.deepEqual(
      (r.body.projects as { name: string }[]).map((p) => p.name),
      ['alpha', 'beta'],
    );
    await t.admin.call('expireApiKey', { id: rotated.id });
  });

  for (const [transport, callOf] of [
    ['gRPC', () => grpcCall],
    ['REST', () => restCall],
  ] as const) {
    describe(`over ${transport}`, () => {
      const exercised = new Set<string>();
      const call: Call = (key, method, req) => {
        if (key === keys.scoped) exercised.add(method);
        return callOf()(key, method, req);
      };
      const ok = async (key: string, method: string, req: Record<string, unknown> = {}) => {
        const r = await call(key, method, req);
        assert.ok(r.ok, `${method} ${JSON.stringify(req)}: ${r.ok ? '' : `${r.code} ${r.message}`}`);
        return r.body;
      };
      const refused = async (
        key: string,
        method: string,
        req: Record<string, unknown>,
        code: string,
        message?: RegExp,
      ) => {
        const r = await call(key, method, req);
        assert.equal(r.ok, false, `${method} ${JSON.stringify(req)} must be refused`);
        if (r.ok) return;
        assert.equal(r.code, code, `${method} ${JSON.stringify(req)}: ${r.message}`);
        if (message) assert.match(r.message, message);
      };
      const names = (rows: unknown, field: string) =>
        (rows as Record<string, string>[]).map((r) => r[field]).sort();

      it('listings show only the key’s projects', async () => {
        const s = keys.scoped;
        assert.deepEqual(names((await ok(s, 'ListProjects')).projects, 'name'), ['alpha']);
        const nodes = (await ok(s, 'ListNodes', { project: '' })).nodes as { id: string }[];
        assert.deepEqual(
          nodes.map((n) => n.id),
          [ids.alphaNode],
        );
        const versions = await ok(s, 'ListDesiredVersions', { project: '' });
        assert.deepEqual(names(versions.desiredVersions, 'project'), ['alpha']);
        assert.deepEqual(names(versions.drift, 'project'), ['alpha']);
        const authKeys = (await ok(s, 'ListAuthKeys', { project: 'alpha' })).authKeys as {
          project: string;
        }[];
        assert.ok(authKeys.length > 0 && authKeys.every((k) => k.project === 'alpha'));
        assert.equal(((await ok(s, 'GetNode', { id: 'web' })).node as { id: string }).id, ids.alphaNode);
        await ok(s, 'GetPolicy', { project: 'alpha' });
        const health = await ok(s, 'Health');
        assert.equal(health.nodesOnline, 1, "only alpha's node counts");
        const audit = (await ok(s, 'ListAuditEntries', {})).entries as { project: string }[];
        assert.ok(audit.length > 0);
        assert.deepEqual([...new Set(audit.map((e) => e.project))], ['alpha']);
      });

      it('changes in its own project go through and are audited under the key', async () => {
        const s = keys.scoped;
        const created = (await ok(s, 'CreateAuthKey', { project: 'alpha', expiration: '10m' })).authKey as {
          id: string;
        };
        await ok(s, 'ExpireAuthKey', { id: created.id });
        await ok(s, 'SetPolicy', {
          project: 'alpha',
          policy: '{"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}',
        });
        await ok(s, 'CheckPolicy', {
          project: 'alpha',
          policy: '{"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}],"tests":[]}',
        });
        await ok(s, 'SetDesiredVersion', {
          project: 'alpha',
          tag: '',
          version: '1.0.1',
          artifactUrl: 'https://releases.example/meshgate.mjs',
          sha256: 'a'.repeat(64),
        });
        await ok(s, 'SetNodeTags', { id: 'web', tags: ['tag:web'] });
        await ok(s, 'SetNodeRoutes', { id: 'web', approvedRoutes: [] });
        await ok(s, 'ExpireNode', { id: 'web', clear: true });
        await ok(s, 'RenameNode', { id: 'web', name: 'web2' });
        await ok(s, 'RenameNode', { id: ids.alphaNode, project: 'alpha', name: 'web' });
        const entries = (await ok(s, 'ListAuditEntries', { project: 'alpha', since: '1h' })).entries as {
          actor: string;
          action: string;
        }[];
        const mine = entries.filter((e) => e.actor.startsWith('apikey:') && e.action === 'node.rename');
        assert.ok(mine.length >= 2, 'renames are in the audit log with the key as actor');
      });

      it('other projects look as if they did not exist, and stay unchanged', async () => {
        const s = keys.scoped;
        const gone = /project "beta" does not exist/;
        await refused(s, 'ListNodes', { project: 'beta' }, 'NOT_FOUND', gone);
        await refused(s, 'ListAuthKeys', { project: 'beta' }, 'NOT_FOUND', gone);
        await refused(s, 'CreateAuthKey', { project: 'beta' }, 'NOT_FOUND', gone);
        await refused(s, 'ExpireAuthKey', { id: ids.betaAuthKey }, 'NOT_FOUND', gone);
        await refused(s, 'GetPolicy', { project: 'beta' }, 'NOT_FOUND', gone);
        await refused(s, 'SetPolicy', { project: 'beta', policy: '' }, 'NOT_FOUND', gone);
        await refused(s, 'CheckPolicy', { project: 'beta' }, 'NOT_FOUND', gone);
        await refused(s, 'SetDesiredVersion', { project: 'beta', version: '9' }, 'NOT_FOUND', gone);
        await refused(s, 'ListDesiredVersions', { project: 'beta' }, 'NOT_FOUND', gone);
        await refused(s, 'ListAuditEntries', { project: 'beta' }, 'NOT_FOUND', gone);
        // The same answer as for a project that really does not exist.
        await refused(s, 'GetPolicy', { project: 'nosuch' }, 'NOT_FOUND', /project "nosuch" does not exist/);
        for (const [method, extra] of [
          ['GetNode', {}],
          ['DeleteNode', {}],
          ['ExpireNode', {}],
          ['RenameNode', { name: 'stolen' }],
          ['SetNodeTags', { tags: ['tag:x'] }],
          ['SetNodeRoutes', { approvedRoutes: [] }],
        ] as const) {
          await refused(s, method, { id: ids.betaNode, ...extra }, 'NOT_FOUND', /no node/);
          await refused(s, method, { id: ids.betaNode.slice(0, 8), ...extra }, 'NOT_FOUND', /no node/);
          await refused(s, method, { id: 'web', project: 'beta', ...extra }, 'NOT_FOUND', gone);
        }
        const beta = (await t.admin.call('getNode', { id: ids.betaNode })).node!;
        assert.equal(beta.name, 'web');
        assert.deepEqual(beta.tags, []);
        const betaKeys = (await t.admin.call('listAuthKeys', { project: 'beta' })).authKeys;
        assert.ok(betaKeys.every((k) => !k.expired));
        assert.equal((await t.admin.call('getPolicy', { project: 'beta' })).policy, '');
      });

      it('projects and API keys need a global key', async () => {
        const s = keys.scoped;
        const need = /limited to project alpha; projects and API keys need a global key/;
        await refused(s, 'CreateProject', { name: 'delta' }, 'PERMISSION_DENIED', need);
        await refused(s, 'DeleteProject', { name: 'alpha', force: true }, 'PERMISSION_DENIED', need);
        await refused(
          s,
          'SetProjectMaxKeyAge',
          { project: 'alpha', maxKeyAge: 'off' },
          'PERMISSION_DENIED',
          need,
        );
        await refused(s, 'CreateApiKey', { projects: ['alpha'] }, 'PERMISSION_DENIED', need);
        await refused(s, 'ListApiKeys', {}, 'PERMISSION_DENIED', need);
        await refused(s, 'ExpireApiKey', { id: ids.otherApiKey }, 'PERMISSION_DENIED', need);
        await refused(s, 'RotateApiKey', { id: ids.otherApiKey }, 'PERMISSION_DENIED', need);
        const names = (await t.admin.call('listProjects', {})).projects.map((p) => p.name);
        assert.deepEqual(names, ['alpha', 'beta', 'gamma']);
        assert.ok(await ok(keys.other, 'Health'), 'the other API key still works');
      });

      it('a read-only key reads its project and changes nothing', async () => {
        const r = keys.readOnly;
        assert.deepEqual(names((await ok(r, 'ListProjects')).projects, 'name'), ['alpha']);
        await ok(r, 'GetNode', { id: 'web' });
        await ok(r, 'CheckPolicy', { project: 'alpha' });
        await ok(r, 'ListAuditEntries', { project: 'alpha' });
        const ro = /read-only/;
        await refused(r, 'CreateAuthKey', { project: 'alpha' }, 'PERMISSION_DENIED', ro);
        await refused(r, 'SetPolicy', { project: 'alpha', policy: '' }, 'PERMISSION_DENIED', ro);
        await refused(r, 'DeleteNode', { id: 'web' }, 'PERMISSION_DENIED', ro);
        await refused(r, 'RenameNode', { id: 'web', name: 'x' }, 'PERMISSION_DENIED', ro);
        await refused(r, 'SetDesiredVersion', { project: 'alpha', version: '2' }, 'PERMISSION_DENIED', ro);
        await refused(r, 'GetPolicy', { project: 'beta' }, 'NOT_FOUND');

        const g = keys.globalReadOnly;
        assert.deepEqual(names((await ok(g, 'ListProjects')).projects, 'name'), ['alpha', 'beta', 'gamma']);
        assert.ok(((await ok(g, 'ListApiKeys')).apiKeys as unknown[]).length >= 5);
        await refused(g, 'CreateProject', { name: 'delta' }, 'PERMISSION_DENIED', ro);
        await refused(g, 'ExpireApiKey', { id: ids.otherApiKey }, 'PERMISSION_DENIED', ro);
        assert.equal((await t.admin.call('getNode', { id: ids.alphaNode })).node!.name, 'web');
      });

      it('a global key keeps its full reach', async () => {
        const k = keys.global;
        assert.deepEqual(names((await ok(k, 'ListProjects')).projects, 'name'), ['alpha', 'beta', 'gamma']);
        assert.equal(((await ok(k, 'ListNodes', { project: '' })).nodes as unknown[]).length, 2);
        assert.equal((await ok(k, 'Health')).nodesOnline, 2);
        await ok(k, 'GetPolicy', { project: 'beta' });
        const audit = (await ok(k, 'ListAuditEntries', {})).entries as { action: string }[];
        assert.ok(audit.some((e) => e.action === 'apikey.create'));
      });

      it('every admin method was tried with the scoped key', () => {
        const missing = AdminService.methods.map((m) => m.name).filter((m) => !exercised.has(m));
        assert.deepEqual(missing, []);
      });
    });
  }
});
