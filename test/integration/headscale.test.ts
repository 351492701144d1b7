// Headscale v0.28's gRPC API as metal-api and metal-apiserver call it: their
// sequence of calls, on SQLite and PostgreSQL, over plaintext HTTP/2 (h2c)
// and TLS, with a client built from proto/headscale/v1.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import { timestampDate, timestampFromMs } from '@bufbuild/protobuf/wkt';
import * as grpc from '@grpc/grpc-js';
import { dial } from '../../proto/dial.js';
import { HeadscaleService } from '../../proto/gen/headscale/v1/headscale_pb.js';
import { type In, makeClient, type Out, unary } from '../../proto/grpc.js';
import { SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';
import { type PostgresCluster, postgresSkip, startPostgres } from './postgres.js';

const METAL_POLICY = '{"acls":[{"action":"accept","src":["autogroup:member"],"dst":["autogroup:self:*"]}]}';
const HOUR = 3_600_000;

type Methods = keyof (typeof HeadscaleService)['method'] & string;

class HeadscaleClient {
  constructor(
    readonly client: grpc.Client,
    private readonly bearer: string | null,
  ) {}

  as(bearer: string | null): HeadscaleClient {
    return new HeadscaleClient(this.client, bearer);
  }

  call<K extends Methods>(method: K, req: Partial<In<typeof HeadscaleService, K>>) {
    const md = new grpc.Metadata();
    if (this.bearer !== null) md.set('authorization', this.bearer);
    const input = HeadscaleService.method[method].input;
    return unary(this.client, HeadscaleService, method, create(input, req as never) as never, md, {
      deadline: Date.now() + 10_000,
    }) as Promise<Out<typeof HeadscaleService, K>>;
  }

  /** A method outside the proto, called with an empty body, as an older or newer client might. */
  raw(name: string): Promise<unknown> {
    const md = new grpc.Metadata();
    if (this.bearer !== null) md.set('authorization', this.bearer);
    return new Promise((resolve, reject) =>
      this.client.makeUnaryRequest(
        `/headscale.v1.HeadscaleService/${name}`,
        (b: Buffer) => b,
        (b: Buffer) => b,
        Buffer.alloc(0),
        md,
        (err, res) => (err ? reject(err) : resolve(res)),
      ),
    );
  }

  close(): void {
    this.client.close();
  }
}

async function rejects(p: Promise<unknown>, code: grpc.status, details?: RegExp): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (err) {
    const e = err as grpc.ServiceError;
    assert.equal(e.code, code, `expected ${grpc.status[code]}, got ${grpc.status[e.code]}: ${e.details}`);
    if (details) assert.match(e.details, details);
    return e;
  }
  assert.fail(`expected ${grpc.status[code]}, the call succeeded`);
}

async function connect(t: TestCoordinator, tls: boolean): Promise<HeadscaleClient> {
  const key = (await t.admin.call('createApiKey', { expiration: '365d', description: 'metal-api' })).apiKey!
    .key;
  const port = t.c.headscalePort!;
  if (!tls) {
    return new HeadscaleClient(
      makeClient(HeadscaleService, `127.0.0.1:${port}`, grpc.credentials.createInsecure()),
      `Bearer ${key}`,
    );
  }
  const endpoint = await dial(`grpcs://127.0.0.1:${port}`, { fingerprint: t.fingerprint });
  return new HeadscaleClient(
    makeClient(HeadscaleService, endpoint.target, endpoint.credentials, endpoint.options),
    `Bearer ${key}`,
  );
}

/** metal-api's calls, in its order, each checked for what the client relies on. */
async function metalSequence(t: TestCoordinator, hs: HeadscaleClient): Promise<void> {
  assert.equal((await hs.call('health', {})).databaseConnectivity, true);

  const set = await hs.call('setPolicy', { policy: METAL_POLICY });
  assert.equal(set.policy, METAL_POLICY);
  const got = await hs.call('getPolicy', {});
  assert.equal(got.policy, METAL_POLICY, 'the policy comes back byte for byte');
  assert.ok(got.updatedAt, 'with updated_at');

  const project = randomUUID();
  assert.deepEqual((await hs.call('listUsers', { name: project })).users, [], 'an unknown name is no error');
  const created = (await hs.call('createUser', { name: project })).user!;
  assert.equal(created.name, project);
  assert.ok(created.id > 0n, 'the new user has a non-zero id');
  const dup = await rejects(hs.call('createUser', { name: project }), grpc.status.INTERNAL);
  assert.ok(dup.details.includes('UNIQUE constraint failed'), dup.details);
  const other = (await hs.call('createUser', { name: `${project}-b` })).user!;
  assert.ok(other.id > created.id);
  const found = (await hs.call('listUsers', { name: project })).users;
  assert.deepEqual(
    found.map((u) => [u.id, u.name]),
    [[created.id, project]],
    'exact match on the name',
  );
  assert.equal((await hs.call('listUsers', { id: other.id })).users[0]?.name, `${project}-b`);

  const now = Date.now();
  const firewall = (
    await hs.call('createPreAuthKey', {
      user: created.id,
      reusable: false,
      ephemeral: false,
      expiration: timestampFromMs(now + 2 * HOUR),
    })
  ).preAuthKey!;
  assert.match(firewall.key, /^mgkey_auth_/);
  assert.ok(firewall.id > 0n);
  assert.equal(firewall.user?.name, project);
  assert.equal(firewall.user?.id, created.id);
  assert.deepEqual([firewall.reusable, firewall.ephemeral, firewall.used], [false, false, false]);
  assert.ok(Math.abs(timestampDate(firewall.expiration!).getTime() - (now + 2 * HOUR)) < 5_000);
  assert.ok(firewall.createdAt);
  const operator = (
    await hs.call('createPreAuthKey', {
      user: created.id,
      ephemeral: true,
      expiration: timestampFromMs(now + HOUR),
      aclTags: ['tag:ops'],
    })
  ).preAuthKey!;
  assert.equal(operator.ephemeral, true);
  assert.deepEqual(operator.aclTags, ['tag:ops']);
  await rejects(
    hs.call('createPreAuthKey', { user: 999_999n, expiration: timestampFromMs(now + HOUR) }),
    grpc.status.NOT_FOUND,
  );
  await rejects(
    hs.call('createPreAuthKey', { user: created.id, expiration: timestampFromMs(now - 1000) }),
    grpc.status.INVALID_ARGUMENT,
    /past/,
  );

  assert.deepEqual((await hs.call('listNodes', { user: project })).nodes, []);
  const machine = randomUUID();
  const agent = new SimAgent(t.url, t.fingerprint);
  try {
    await agent.register(firewall.key, machine);
    await agent.connect();
    const nodes = (await hs.call('listNodes', { user: project })).nodes;
    assert.equal(nodes.length, 1);
    const n = nodes[0]!;
    assert.equal(n.name, machine, 'name is the hostname the agent asked for');
    assert.equal(n.user?.name, project);
    assert.equal(n.online, true);
    assert.match(n.ipAddresses[0]!, /^100\.\d+\.\d+\.\d+$/, 'IPv4 first, no prefix length');
    assert.match(n.ipAddresses[1]!, /^fd7a:115c:a1e0:[0-9a-f:]+$/);
    assert.ok(n.id > 0n && n.lastSeen && n.createdAt);
    assert.equal(n.registerMethod, 1, 'REGISTER_METHOD_AUTH_KEY');
    const all = (await hs.call('listNodes', {})).nodes;
    assert.ok(
      all.some((x) => x.id === n.id && x.user?.name === project),
      'ListNodes({}) has every node',
    );
    assert.deepEqual((await hs.call('listNodes', { user: randomUUID() })).nodes, []);
    await rejects(hs.call('deleteNode', { nodeId: n.id + 1000n }), grpc.status.NOT_FOUND);
    await hs.call('deleteNode', { nodeId: n.id });
    assert.deepEqual((await hs.call('listNodes', { user: project })).nodes, []);
    await rejects(hs.call('deleteNode', { nodeId: n.id }), grpc.status.NOT_FOUND, /does not exist/);
  } finally {
    agent.close();
  }

  await rejects(hs.as(null).call('listUsers', {}), grpc.status.UNAUTHENTICATED);
  await rejects(hs.as('Bearer mgkey_api_000000000000_x').call('listUsers', {}), grpc.status.UNAUTHENTICATED);
  await rejects(hs.as('Basic abc').call('health', {}), grpc.status.UNAUTHENTICATED);
  assert.ok(
    t.logs.some((l) => l.includes('refused call') && l.includes('ListUsers')),
    'refusals are logged',
  );
  await rejects(hs.raw('RegisterNode'), grpc.status.UNIMPLEMENTED, /meshgate keys create/);

  // Headscale has no scoped keys: a scoped or read-only key gets nothing here.
  for (const scope of [{ projects: [project] }, { readOnly: true }]) {
    const limited = (await t.admin.call('createApiKey', { description: 'limited', ...scope })).apiKey!.key;
    await rejects(
      hs.as(`Bearer ${limited}`).call('listUsers', {}),
      grpc.status.PERMISSION_DENIED,
      /global API key/,
    );
  }

  const [apiKey] = (await t.admin.call('listApiKeys', {})).apiKeys;
  await t.admin.call('expireApiKey', { id: apiKey!.id });
  await rejects(hs.call('health', {}), grpc.status.UNAUTHENTICATED, /was expired/);
}

function suite(database: () => string | undefined, label: string) {
  for (const tls of [false, true]) {
    it(`answers metal-api's sequence over ${tls ? 'TLS' : 'h2c'} (${label})`, async () => {
      const url = database();
      const t = await startTestCoordinator({
        headscaleListen: '127.0.0.1:0',
        headscaleInsecure: !tls,
        ...(url ? { database: url } : {}),
      });
      const hs = await connect(t, tls);
      try {
        await metalSequence(t, hs);
      } finally {
        hs.close();
        await t.close();
      }
    });
  }
}

describe('Headscale API on SQLite', () => {
  suite(() => undefined, 'SQLite');

  it("serves the admin UIs' node and user calls and warns about plaintext", async () => {
    const t = await startTestCoordinator({ headscaleListen: '127.0.0.1:0', headscaleInsecure: true });
    const hs = await connect(t, false);
    const agent = new SimAgent(t.url, t.fingerprint);
    try {
      assert.ok(t.logs.some((l) => l.includes('"level":40') && l.includes('plaintext (h2c)')));
      const user = (await hs.call('createUser', { name: 'ui' })).user!;
      const key = (await hs.call('createPreAuthKey', { user: user.id, aclTags: ['tag:web'] })).preAuthKey!;
      await agent.register(key.key, 'Web-1.example.net');
      const [listed] = (await hs.call('listNodes', { user: 'ui' })).nodes;
      assert.equal(listed?.name, 'Web-1.example.net');
      assert.equal(listed?.givenName, 'web-1');
      const id = listed!.id;
      assert.equal((await hs.call('getNode', { nodeId: id })).node?.name, 'Web-1.example.net');
      assert.equal((await hs.call('renameNode', { nodeId: id, newName: 'web-a' })).node?.givenName, 'web-a');
      await rejects(
        hs.call('renameNode', { nodeId: id, newName: 'Not A Label' }),
        grpc.status.INVALID_ARGUMENT,
      );
      assert.deepEqual((await hs.call('setTags', { nodeId: id, tags: ['tag:db'] })).node?.tags, ['tag:db']);
      await rejects(hs.call('setTags', { nodeId: id, tags: ['db'] }), grpc.status.INVALID_ARGUMENT);
      const expired = (await hs.call('expireNode', { nodeId: id })).node!;
      assert.ok(expired.expiry && timestampDate(expired.expiry).getTime() <= Date.now());
      await rejects(hs.call('getNode', { nodeId: 0n }), grpc.status.NOT_FOUND);
      await rejects(
        hs.call('deleteUser', { id: user.id }),
        grpc.status.FAILED_PRECONDITION,
        /still has 1 node/,
      );
      await hs.call('deleteNode', { nodeId: id });
      await hs.call('deleteUser', { id: user.id });
      assert.deepEqual((await hs.call('listUsers', { name: 'ui' })).users, []);
      const again = (await hs.call('createUser', { name: 'ui' })).user!;
      assert.ok(again.id > user.id, 'the number of a deleted user is not given again');
      const apiKeys = (await hs.call('listApiKeys', {})).apiKeys;
      assert.equal(apiKeys.length, 1);
      assert.equal(apiKeys[0]!.id, BigInt(`0x${apiKeys[0]!.prefix}`));
      assert.ok(apiKeys[0]!.lastSeen, 'the key in use has been seen');
    } finally {
      agent.close();
      hs.close();
      await t.close();
    }
  });

  it('applies the global policy to projects without their own, autogroup:self as the project', async () => {
    const t = await startTestCoordinator({ headscaleListen: '127.0.0.1:0', headscaleInsecure: true });
    const hs = await connect(t, false);
    const agents: SimAgent[] = [];
    try {
      const join = async (project: string, name: string) => {
        const user =
          (await hs.call('listUsers', { name: project })).users[0] ??
          (await hs.call('createUser', { name: project })).user!;
        const key = (
          await hs.call('createPreAuthKey', { user: user.id, expiration: timestampFromMs(Date.now() + HOUR) })
        ).preAuthKey!.key;
        const a = new SimAgent(t.url, t.fingerprint);
        agents.push(a);
        await a.register(key, name);
        await a.connect();
        return a;
      };
      await hs.call('setPolicy', { policy: METAL_POLICY });
      // Each joins with a key of its own: autogroup:self must pair them by project, not by key.
      const a1 = await join('alpha', 'a1');
      const a2 = await join('alpha', 'a2');
      const b1 = await join('beta', 'b1');
      await a1.waitFor(() => a1.peerIds().includes(a2.id), 3000, 'a1 to see a2');
      assert.deepEqual(b1.peerIds(), [], 'projects stay apart');

      const refused = await rejects(
        hs.call('setPolicy', { policy: '{\n  "acls": [],\n  "ssh": []\n}' }),
        grpc.status.INVALID_ARGUMENT,
        /policy:3:3: .*ssh/,
      );
      assert.ok(refused.details);
      await rejects(
        hs.call('setPolicy', { policy: '{"acls":[{"action":"accept","src":["alice@"],"dst":["*:*"]}]}' }),
        grpc.status.INVALID_ARGUMENT,
        /policy:1:\d+/,
      );
      assert.equal((await hs.call('getPolicy', {})).policy, METAL_POLICY, 'a refused policy changes nothing');

      // A project's own policy wins over the global one.
      await t.admin.call('setPolicy', { project: 'alpha', policy: '{"acls":[]}' });
      await a1.waitFor(() => a1.peerIds().length === 0, 3000, 'a1 to lose a2');
    } finally {
      for (const a of agents) a.close();
      hs.close();
      await t.close();
    }
  });
});

describe('Headscale API on PostgreSQL', { skip: postgresSkip('Headscale API on PostgreSQL') }, () => {
  let pg: PostgresCluster | null = null;
  let n = 0;
  after(() => pg?.stop());
  suite(() => {
    pg ??= startPostgres();
    return pg.createDatabase(`headscale${n++}`);
  }, 'PostgreSQL');
});
