import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { create, toBinary } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import { hashSecret, parseSecret } from '../../coordinator/state/secrets.js';
import { dial } from '../../proto/dial.js';
import { ControlService, RegisterRequestSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import type { NetMap } from '../../proto/gen/meshgate/v1/types_pb.js';
import { makeClient, methodPath, unary } from '../../proto/grpc.js';
import { generateMachineKey, generateNodeKey, type MachineKeyPair } from '../../proto/keys.js';
import { NETMAP_FEATURES_HEADER, withSharedPeers } from '../../proto/netmap.js';
import { signCall } from '../../proto/signing.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

describe('coordinator over real gRPC + TLS', () => {
  let t: TestCoordinator;
  const agents: SimAgent[] = [];
  const agent = (machine?: MachineKeyPair) => {
    const a = new SimAgent(t.url, t.fingerprint, machine);
    agents.push(a);
    return a;
  };

  before(async () => {
    t = await startTestCoordinator({ ephemeralTimeout: '400ms' });
  });
  after(async () => {
    for (const a of agents) a.close();
    await t.close();
  });

  it('registers, sends the full netmap, then a new node as a delta and its removal after nodes delete', async () => {
    const key = await authKey(t, 'alpha', { reusable: true });
    const a = agent();
    const reg = await a.register(key, 'web-1');
    assert.equal(reg.existing, false);
    assert.match(reg.node!.ipAddresses[0]!, /^100\.(6[4-9]|[7-9]\d|1[01]\d|12[0-7])\.\d+\.\d+$/);
    assert.match(reg.node!.ipAddresses[1]!, /^fd7a:115c:a1e0::/);
    await a.connect();
    assert.equal(a.messages[0]!.seq, 1n);
    assert.ok(a.messages[0]!.full, 'first message is the full netmap');
    assert.deepEqual(a.peerIds(), []);

    const b = agent();
    await b.register(key, 'web-2');
    await b.connect();
    assert.deepEqual(b.peerIds(), [a.id]);
    await a.waitFor(() => a.peerIds().includes(b.id), 3000, 'b in a netmap');
    const delta = a.messages.find((m) => m.peersChanged.some((p) => p.id === b.id))!;
    assert.equal(delta.full, undefined, 'b arrived as a delta, not a new full netmap');
    const peerB = a.netmap!.peers.find((p) => p.id === b.id)!;
    assert.deepEqual(peerB.allowedIps, [
      `${b.netmap!.self!.ipAddresses[0]}/32`,
      `${b.netmap!.self!.ipAddresses[1]}/128`,
    ]);
    await a.waitFor(() => a.netmap!.peers.find((p) => p.id === b.id)?.online === true, 3000, 'b online');

    await t.admin.call('deleteNode', { id: b.id, project: '' });
    await a.waitFor(() => !a.peerIds().includes(b.id), 3000, 'b removed from a');
    await b.waitFor(() => b.ended !== null, 3000, 'b stream closed');
    const nodes = (await t.admin.call('listNodes', { project: 'alpha' })).nodes;
    assert.deepEqual(
      nodes.map((n) => n.name),
      ['web-1'],
    );
    for (let i = 1; i < a.messages.length; i++) assert.equal(a.messages[i]!.seq, a.messages[i - 1]!.seq + 1n);
  });

  it('re-registration with the same machine key is idempotent, even with a spent single-use key', async () => {
    const key = await authKey(t, 'bravo');
    const a = agent();
    const first = await a.register(key, 'fw-1');
    const again = new SimAgent(t.url, t.fingerprint, a.machine);
    agents.push(again);
    const second = await again.register(key, 'fw-1');
    assert.equal(second.existing, true);
    assert.equal(second.node!.id, first.node!.id);
    assert.deepEqual(second.node!.ipAddresses, first.node!.ipAddresses);
    const other = agent();
    await assert.rejects(other.register(key, 'fw-2'), (err: grpc.ServiceError) => {
      assert.equal(err.code, grpc.status.UNAUTHENTICATED);
      assert.match(err.details, /single-use and was already used/);
      return true;
    });
  });

  it('refuses expired and revoked keys with a reason', async () => {
    const expired = await authKey(t, 'bravo', { expiration: '1ms' });
    await new Promise((r) => setTimeout(r, 5));
    await assert.rejects(agent().register(expired, 'x'), /expired; ask for a new one/);
    const revoked = await authKey(t, 'bravo');
    const { id } = parseSecret('auth', revoked)!;
    await t.admin.call('expireAuthKey', { id });
    await assert.rejects(agent().register(revoked, 'x'), /was expired by an admin/);
    await assert.rejects(
      agent().register(`mgkey_auth_000000000000_${'A'.repeat(43)}`, 'x'),
      /unknown auth key/,
    );
    assert.ok(
      t.logs.some((l) => l.includes('refused call') && l.includes('"peer":"127.0.0.1"')),
      'refusals are logged with the peer address',
    );
  });

  it('keeps two projects apart', async () => {
    const k1 = await authKey(t, 'p-one', { reusable: true });
    const k2 = await authKey(t, 'p-two', { reusable: true });
    const [a1, a2, b1, b2] = [agent(), agent(), agent(), agent()];
    await a1.register(k1, 'a1');
    await a2.register(k1, 'a2');
    await b1.register(k2, 'b1');
    await b2.register(k2, 'b2');
    for (const x of [a1, a2, b1, b2]) await x.connect();
    await a1.waitFor(() => a1.peerIds().length === 1, 3000, 'a1 sees a2');
    await b1.waitFor(() => b1.peerIds().length === 1, 3000, 'b1 sees b2');
    assert.deepEqual(a1.peerIds(), [a2.id]);
    assert.deepEqual(b1.peerIds(), [b2.id]);
    assert.deepEqual(b2.peerIds(), [b1.id]);
  });

  it('policy changes shrink and grow visibility and the packet filter', async () => {
    await authKey(t, 'pol');
    const ops = agent();
    const fw = agent();
    const m1 = agent();
    await ops.register(await authKey(t, 'pol', { tags: ['tag:ops'] }), 'op');
    await fw.register(await authKey(t, 'pol', { tags: ['tag:firewall'] }), 'fw');
    await m1.register(await authKey(t, 'pol', { tags: ['tag:machine'] }), 'm1');
    for (const x of [ops, fw, m1]) await x.connect();
    await m1.waitFor(() => m1.peerIds().length === 2, 3000, 'no policy: all see all');

    const policy = `{
      // ops may reach firewalls on SSH only
      "tagOwners": { "tag:ops": [], "tag:firewall": [], "tag:machine": [], },
      "acls": [ { "action": "accept", "src": ["tag:ops"], "dst": ["tag:firewall:22"] }, ],
    }`;
    await t.admin.call('setPolicy', { project: 'pol', policy });
    await m1.waitFor(() => m1.peerIds().length === 0, 3000, 'm1 sees nobody');
    await ops.waitFor(() => ops.peerIds().join() === fw.id, 3000, 'ops sees only fw');
    await fw.waitFor(() => fw.peerIds().join() === ops.id, 3000, 'fw sees only ops');
    await fw.waitFor(() => (fw.netmap!.packetFilter?.rules.length ?? 0) > 0, 3000, 'fw filter');
    const rule = fw.netmap!.packetFilter!.rules[0]!;
    assert.ok(rule.srcCidrs.includes(`${ops.netmap!.self!.ipAddresses[0]}/32`));
    assert.deepEqual(
      rule.ports.map((p) => [p.first, p.last]),
      [[22, 22]],
    );

    await assert.rejects(
      t.admin.call('setPolicy', {
        project: 'pol',
        policy: '{ "acls": [ { "action": "accept", "src": ["tag:nope"], "dst": ["*:*"] } ] }',
      }),
      (err: grpc.ServiceError) => {
        assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
        assert.match(err.details, /1:\d+/);
        return true;
      },
    );
    assert.equal(
      (await t.admin.call('getPolicy', { project: 'pol' })).policy,
      policy,
      'old policy kept on error',
    );

    await t.admin.call('setPolicy', { project: 'pol', policy: '' });
    await m1.waitFor(() => m1.peerIds().length === 2, 3000, 'policy removed: all see all again');
  });

  it('gives an agent without the netmap-features header the full form, and one with it the same netmap in fewer bytes', async () => {
    const key = await authKey(t, 'forms', { reusable: true });
    const router = agent();
    await router.register(key, 'router', { routes: ['10.20.0.0/16'] });
    await t.admin.call('setNodeRoutes', {
      id: router.id,
      project: 'forms',
      approvedRoutes: ['10.20.0.0/16'],
    });
    await router.connect();
    // An agent of an earlier release opens its stream without the header.
    const withoutHeader: grpc.Interceptor = (options, next) =>
      new grpc.InterceptingCall(next(options), {
        start(metadata, listener, start) {
          metadata.remove(NETMAP_FEATURES_HEADER);
          start(metadata, listener);
        },
      });
    const old = new SimAgent(t.url, t.fingerprint, undefined, { interceptors: [withoutHeader] });
    agents.push(old);
    const fresh = agent();
    await old.register(key, 'old');
    await fresh.register(key, 'fresh');
    await old.connect();
    await fresh.connect();

    const wire = (a: SimAgent) => a.messages[0]!.full!;
    const routerOn = (m: NetMap) => m.peers.find((p) => p.id === router.id)!;
    const r = router.netmap!.self!.ipAddresses;
    assert.deepEqual(routerOn(wire(old)).allowedIps, [`${r[0]}/32`, `${r[1]}/128`, '10.20.0.0/16']);
    assert.deepEqual(
      wire(old).dns.map((d) => d.name),
      ['old.forms.mesh', ...wire(old).peers.map((p) => `${p.name}.forms.mesh`)],
    );
    // The fresh agent's peers come compressed, shared with every node of the project.
    assert.deepEqual(wire(fresh).peers, []);
    assert.ok(wire(fresh).sharedPeers.length > 0);
    assert.equal(wire(old).sharedPeers.length, 0);
    assert.deepEqual(
      routerOn(withSharedPeers(wire(fresh))).allowedIps,
      ['10.20.0.0/16'],
      'only what is not implied',
    );
    assert.deepEqual(
      wire(fresh).dns.map((d) => d.name),
      ['fresh.forms.mesh'],
    );
    // What the agent decodes is the full form again.
    assert.deepEqual(routerOn(fresh.netmap!).allowedIps, routerOn(wire(old)).allowedIps);
    assert.deepEqual(
      fresh.netmap!.dns.find((d) => d.name === 'router.forms.mesh'),
      wire(old).dns.find((d) => d.name === 'router.forms.mesh'),
    );
    assert.deepEqual(
      fresh.netmap!.peers.map((p) => p.allowedIps.slice(0, 2)),
      fresh.netmap!.peers.map((p) => p.ipAddresses.map((a, i) => `${a}/${i ? 128 : 32}`)),
    );
    // And in a delta: the old agent arrives in the router's netmap as the fresh one would.
    await router.waitFor(() => router.peerIds().length === 2, 3000, 'router sees both');
    const delta = router.messages.find((m) => m.peersChanged.some((p) => p.id === old.id))!;
    assert.deepEqual(delta.peersChanged.find((p) => p.id === old.id)!.allowedIps, []);
    const o = old.netmap!.self!.ipAddresses;
    assert.deepEqual(router.netmap!.peers.find((p) => p.id === old.id)!.allowedIps, [
      `${o[0]}/32`,
      `${o[1]}/128`,
    ]);
  });

  it('reaps ephemeral nodes after inactivity and at once on logout', async () => {
    const key = await authKey(t, 'eph', { reusable: true, ephemeral: true });
    const watcher = agent();
    await watcher.register(await authKey(t, 'eph'), 'watcher');
    await watcher.connect();
    const e1 = agent();
    await e1.register(key, 'laptop-1');
    await e1.connect();
    await watcher.waitFor(() => watcher.peerIds().includes(e1.id), 3000, 'e1 visible');
    e1.disconnect();
    await watcher.waitFor(() => !watcher.peerIds().includes(e1.id), 5000, 'e1 reaped after inactivity');

    const e2 = agent();
    await e2.register(key, 'laptop-2');
    await e2.connect();
    await watcher.waitFor(() => watcher.peerIds().includes(e2.id), 3000, 'e2 visible');
    await e2.client.logout();
    await watcher.waitFor(() => !watcher.peerIds().includes(e2.id), 1000, 'e2 gone at logout');
    const names = (await t.admin.call('listNodes', { project: 'eph' })).nodes.map((n) => n.name);
    assert.deepEqual(names, ['watcher']);
  });

  it('refuses forged, replayed, stale and unsigned calls', async () => {
    const key = await authKey(t, 'sec', { reusable: true });
    const endpoint = await dial(t.url, { fingerprint: t.fingerprint });
    const client = makeClient(ControlService, endpoint.target, endpoint.credentials);
    const machine = generateMachineKey();
    const req = create(RegisterRequestSchema, {
      authKey: key,
      machineKey: machine.publicKey,
      nodeKey: generateNodeKey().publicKey,
      hostname: 'h',
      endpoints: [],
    });
    const REGISTER = methodPath(ControlService, ControlService.methods[0]!);
    const md = (sig: object) => {
      const m = new grpc.Metadata();
      for (const [k, v] of Object.entries(sig)) m.set(k, String(v));
      return m;
    };
    const expectRefused = (p: Promise<unknown>, re: RegExp) =>
      assert.rejects(p, (err: grpc.ServiceError) => {
        assert.equal(err.code, grpc.status.UNAUTHENTICATED);
        assert.match(err.details, re);
        return true;
      });
    await expectRefused(unary(client, ControlService, 'register', req, new grpc.Metadata()), /not signed/);
    const forger = generateMachineKey();
    const forged = signCall(forger.secretKey, REGISTER, '', toBinary(RegisterRequestSchema, req));
    await expectRefused(unary(client, ControlService, 'register', req, md(forged)), /another machine key/);
    const tampered = signCall(
      machine.secretKey,
      REGISTER,
      '',
      toBinary(RegisterRequestSchema, { ...req, hostname: 'other' }),
    );
    await expectRefused(unary(client, ControlService, 'register', req, md(tampered)), /bad call signature/);
    const stale = signCall(
      machine.secretKey,
      REGISTER,
      '',
      toBinary(RegisterRequestSchema, req),
      Date.now() - 10 * 60_000,
    );
    await expectRefused(
      unary(client, ControlService, 'register', req, md(stale)),
      /off the coordinator's clock/,
    );
    const good = signCall(machine.secretKey, REGISTER, '', toBinary(RegisterRequestSchema, req));
    await unary(client, ControlService, 'register', req, md(good));
    await expectRefused(unary(client, ControlService, 'register', req, md(good)), /replayed/);
    client.close();
  });

  it('refuses a stream for another project node id and for a deleted node', async () => {
    const a = agent();
    await a.register(await authKey(t, 'sec'), 'sa');
    const impostor = agent();
    await impostor.register(await authKey(t, 'sec-other'), 'impostor');
    impostor.client.nodeId = a.id;
    await assert.rejects(impostor.connect(), /another machine key/);
    await t.admin.call('deleteNode', { id: a.id, project: '' });
    await assert.rejects(a.connect(), /unknown node/);
  });

  it('cuts an expired node off at its expiry time, refuses its streams, and takes it back with a new key', async () => {
    const key = await authKey(t, 'exp', { reusable: true });
    const a = agent();
    const b = agent();
    await a.register(key, 'ea');
    await b.register(key, 'eb');
    await a.connect();
    await b.connect();
    await a.waitFor(() => a.peerIds().includes(b.id), 3000, 'b visible');
    const expiresIn = 300;
    const expiry = Date.now() + expiresIn;
    await t.admin.call('expireNode', { id: b.id, project: 'exp', expiration: `${expiresIn}ms` });
    assert.ok(Date.now() < expiry, 'the expiry time is still to come');
    assert.ok(a.peerIds().includes(b.id), 'b stays a peer until its expiry time');
    await a.waitFor(() => !a.peerIds().includes(b.id), 3000, 'b dropped by the expiry sweep');
    assert.ok(Date.now() >= expiry, 'not before its time');
    await b.waitFor(() => b.ended !== null, 3000, "b's stream closed");
    assert.equal((b.ended as grpc.StatusObject).code, grpc.status.UNAUTHENTICATED);

    b.disconnect();
    await assert.rejects(b.connect(), /node eb has expired; register again with a new auth key/);
    const back = await b.register(await authKey(t, 'exp'), 'eb');
    assert.equal(back.existing, true, 'a new key re-authorizes the same node');
    assert.equal(back.node!.id, b.id);
    await b.connect();
    await a.waitFor(() => a.peerIds().includes(b.id), 3000, 'b back in the mesh');
  });

  it('gives 100 concurrent registrations 100 distinct addresses', async () => {
    const key = await authKey(t, 'burst', { reusable: true });
    const many = Array.from({ length: 100 }, () => agent());
    const results = await Promise.all(many.map((a, i) => a.register(key, `m-${i}`)));
    const v4 = new Set(results.map((r) => r.node!.ipAddresses[0]));
    const v6 = new Set(results.map((r) => r.node!.ipAddresses[1]));
    const names = new Set(results.map((r) => r.node!.name));
    assert.equal(v4.size, 100);
    assert.equal(v6.size, 100);
    assert.equal(names.size, 100);
    for (const a of many) a.close();
  });

  it('keeps auth key secrets out of the database files and the logs', async () => {
    const key = await authKey(t, 'secret-check');
    const { secret } = parseSecret('auth', key)!;
    await agent().register(key, 'sc');
    const files = readdirSync(t.dataDir).filter((f) => f.startsWith('meshgate.db'));
    for (const f of files) {
      assert.ok(!readFileSync(join(t.dataDir, f)).includes(secret), `${f} does not contain the secret`);
    }
    // The search can find what is there: the hash of exactly this secret is stored.
    assert.ok(
      files.some((f) => readFileSync(join(t.dataDir, f)).includes(hashSecret(secret))),
      'the database holds the hash of the whole secret',
    );
    assert.ok(!t.logs.join('').includes(secret), 'logs do not contain the secret');
  });
});
