// Several coordinators on one PostgreSQL database (docs/ha.md): a throwaway
// cluster, three coordinators in this process, simulated agents spread over
// them.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import type * as grpc from '@grpc/grpc-js';
import { status as grpcStatus, Metadata } from '@grpc/grpc-js';
import { Kysely, PostgresDialect } from 'kysely';
import Pg from 'pg';
import { ControlClient } from '../../agent/control/client.js';
import { ControlSession } from '../../agent/control/session.js';
import { connectAdmin } from '../../cli/admin-client.js';
import { ensureTlsIdentity } from '../../coordinator/tls.js';
import { dial } from '../../proto/dial.js';
import {
  type RelayRequest,
  RelayRequestSchema,
  type RelayResponse,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import { ForwardRelayRequestSchema, ReplicaService } from '../../proto/gen/meshgate/v1/replica_pb.js';
import type { NetMap } from '../../proto/gen/meshgate/v1/types_pb.js';
import { makeClient } from '../../proto/grpc.js';
import { generateMachineKey, generateNodeKey } from '../../proto/keys.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';
import { type PostgresCluster, postgresSkip, startPostgres } from './postgres.js';
import { BIN, stop } from './process.js';

const skip = postgresSkip('high-availability test');

async function until(pred: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** A coordinator in a child process, so that it can be killed with SIGKILL. */
function spawnCoordinator(
  args: string[],
): Promise<{ proc: ChildProcess; grpcPort: number; fingerprint: string }> {
  return new Promise((resolve, reject) => {
    const proc = spawn(
      process.execPath,
      [
        BIN,
        'coordinator',
        '--grpc-listen',
        '127.0.0.1:0',
        '--http-listen',
        '127.0.0.1:0',
        '--log-level',
        'warn',
        ...args,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    let err = '';
    proc.stderr!.on('data', (d) => {
      err += d;
    });
    proc.stdout!.on('data', (d) => {
      out += d;
      const grpc = /gRPC\s+\S+:(\d+)/.exec(out);
      const fp = /fingerprint\s+(sha256:[0-9a-f]{64})/.exec(out);
      if (grpc && fp) resolve({ proc, grpcPort: Number(grpc[1]), fingerprint: fp[1]! });
    });
    proc.once('exit', (code) => reject(new Error(`coordinator exited with ${code}: ${err}`)));
  });
}

describe('several coordinators on one PostgreSQL database', { skip }, () => {
  let pg: PostgresCluster;
  let url: string;
  const replicas: TestCoordinator[] = [];
  const agents: SimAgent[] = [];

  before(async () => {
    pg = startPostgres();
    url = pg.createDatabase('meshgate');
    for (let i = 0; i < 3; i++)
      replicas.push(await startTestCoordinator({ database: url, ephemeralTimeout: '1s' }));
  });
  after(async () => {
    for (const a of agents) a.close();
    for (const r of replicas) await r.close();
    pg?.stop();
  });

  const agentOn = (r: TestCoordinator, machine?: SimAgent['machine']) => {
    const a = new SimAgent(r.url, r.fingerprint, machine);
    agents.push(a);
    return a;
  };

  it('gives 200 machines registering on three coordinators at once distinct addresses, one node each', async () => {
    const [a, b, c] = replicas as [TestCoordinator, TestCoordinator, TestCoordinator];
    // One project created on all three at once: one creates it, the others say it exists.
    const created = await Promise.allSettled(
      replicas.map((r) => r.admin.call('createProject', { name: 'race' })),
    );
    assert.equal(created.filter((x) => x.status === 'fulfilled').length, 1);
    for (const x of created)
      if (x.status === 'rejected')
        assert.equal((x.reason as grpc.ServiceError).code, grpcStatus.ALREADY_EXISTS);
    const key = await authKey(a, 'reg', { reusable: true });
    await until(
      () => replicas.every((r) => r.c.state.getProject('reg') !== undefined),
      5000,
      'the project everywhere',
    );
    const machines = Array.from({ length: 200 }, (_, i) => agentOn(replicas[i % 3]!));
    // A tenth of the machines register a second time at once, on another coordinator.
    const again = machines.slice(0, 20).map((m, i) => agentOn(replicas[(i + 1) % 3]!, m.machine));
    const results = await Promise.all([
      ...machines.map((m, i) => m.register(key, `m-${i}`)),
      ...again.map((m, i) => m.register(key, `m-${i}`)),
    ]);
    const ids = new Set(results.map((r) => r.node!.id));
    assert.equal(ids.size, 200, 'one node per machine');
    for (const r of replicas) {
      await until(() => r.c.state.listNodes('reg').length === 200, 10_000, 'every node on every coordinator');
      const nodes = r.c.state.listNodes('reg');
      assert.equal(new Set(nodes.map((n) => n.ipv4)).size, 200, 'distinct IPv4 addresses');
      assert.equal(new Set(nodes.map((n) => n.ipv6)).size, 200, 'distinct IPv6 addresses');
      assert.equal(new Set(nodes.map((n) => n.numericId)).size, 200, 'distinct node numbers');
      assert.deepEqual(new Set(nodes.map((n) => n.id)), ids);
    }
    for (const r of [b, c])
      assert.equal((await r.admin.call('listNodes', { project: 'reg' })).nodes.length, 200);
  });

  it('brings a change made on one coordinator to an agent streaming to another', async (t) => {
    const [a, b, c] = replicas as [TestCoordinator, TestCoordinator, TestCoordinator];
    const key = await authKey(a, 'prop', { reusable: true });
    await until(
      () => replicas.every((r) => r.c.state.getProject('prop') !== undefined),
      5000,
      'the project everywhere',
    );
    const x = agentOn(b);
    await x.register(key, 'x');
    await x.connect();
    const y = agentOn(c);
    await y.register(key, 'y');
    await y.connect();
    await x.waitFor(() => x.peerIds().includes(y.id), 5000, 'y in the netmap of x');
    await until(() => a.c.state.isOnline(x.id) && a.c.state.isOnline(y.id), 5000, 'both online on a');

    const started = Date.now();
    await a.admin.call('renameNode', { id: y.id, project: 'prop', name: 'renamed' });
    await x.waitFor(
      () => x.netmap?.peers.find((p) => p.id === y.id)?.name === 'renamed',
      5000,
      'the rename on b',
    );
    const latency = Date.now() - started;
    t.diagnostic(`a rename on a reached an agent on b after ${latency} ms`);
    assert.ok(latency < 2000, `a rename on a reached an agent on b after ${latency} ms`);

    await a.admin.call('deleteNode', { id: y.id, project: 'prop' });
    await x.waitFor(() => !x.peerIds().includes(y.id), 5000, 'y gone from the netmap of x');

    // A coordinator that starts now knows at once who streams to the others.
    const late = await startTestCoordinator({ database: url });
    replicas.push(late);
    assert.ok(late.c.state.isOnline(x.id), 'x online as a coordinator started later sees it');

    // Cut off from the database longer than its lease, b was cleared by the
    // others (as the lease holder does): b registers again with its streams.
    const sql = new Kysely<{
      presence: { node_id: string; replica: string };
      replicas: { id: string };
      changes: { at: number; origin: string; kind: string; ref: string };
    }>({
      dialect: new PostgresDialect({ pool: new Pg.Pool({ connectionString: url, max: 1 }) }),
    });
    try {
      const row = await sql
        .selectFrom('presence')
        .select('replica')
        .where('node_id', '=', x.id)
        .executeTakeFirstOrThrow();
      await sql.transaction().execute(async (tx) => {
        await tx.deleteFrom('presence').where('replica', '=', row.replica).execute();
        await tx.deleteFrom('replicas').where('id', '=', row.replica).execute();
        await tx
          .insertInto('changes')
          .values({ at: Date.now(), origin: 'test', kind: 'presence', ref: x.id })
          .execute();
      });
      const back = async () =>
        (await sql.selectFrom('presence').select('replica').where('node_id', '=', x.id).execute()).length ===
          1 &&
        (await sql.selectFrom('replicas').select('id').where('id', '=', row.replica).execute()).length === 1;
      await until(back, 10_000, 'b and the stream of x back in the database');
      await until(() => a.c.state.isOnline(x.id), 5000, 'x online on a');
    } finally {
      await sql.destroy();
    }

    x.disconnect();
    await until(() => !a.c.state.isOnline(x.id) && !c.c.state.isOnline(x.id), 5000, 'x offline everywhere');
  });

  it('runs the periodic jobs on one coordinator only: an ephemeral node is reaped once', async () => {
    const [a, , c] = replicas as [TestCoordinator, TestCoordinator, TestCoordinator];
    const key = await authKey(a, 'eph', { ephemeral: true });
    await until(
      () => replicas.every((r) => r.c.state.getProject('eph') !== undefined),
      5000,
      'the project everywhere',
    );
    const e = agentOn(c);
    await e.register(key, 'e');
    await e.connect();
    await until(() => a.c.state.isOnline(e.id), 5000, 'e online on a');
    e.disconnect();
    await until(
      () => replicas.every((r) => r.c.state.getNode(e.id) === undefined),
      15_000,
      'the ephemeral node reaped everywhere',
    );
    const audit = await a.admin.call('listAuditEntries', { project: 'eph' });
    const reaps = audit.entries.filter((x) => x.action === 'node.reap' && x.target === e.id);
    assert.equal(reaps.length, 1, 'reaped once');
  });

  it('moves the agents of a coordinator killed with SIGKILL to another, losing nothing acknowledged', async (t) => {
    const tlsDir = mkdtempSync(join(tmpdir(), 'meshgate-ha-tls-'));
    const aDir = mkdtempSync(join(tmpdir(), 'meshgate-ha-a-'));
    await ensureTlsIdentity(tlsDir);
    const tls = { tlsKeyFile: join(tlsDir, 'tls.key'), tlsCertFile: join(tlsDir, 'tls.crt') };
    const b = await startTestCoordinator({ database: url, ...tls });
    replicas.push(b);
    const a = await spawnCoordinator([
      '--data-dir',
      aDir,
      '--database',
      url,
      '--tls-key-file',
      tls.tlsKeyFile,
      '--tls-cert-file',
      tls.tlsCertFile,
    ]);
    let session: ControlSession | null = null;
    try {
      assert.equal(a.fingerprint, b.fingerprint, 'one fingerprint pins both coordinators');
      const key = await authKey(b, 'failover', { reusable: true });
      await until(
        () => replicas.every((r) => r.c.state.getProject('failover') !== undefined),
        5000,
        'the project',
      );
      const y = agentOn(b);
      await y.register(key, 'y');
      await y.connect();

      const aUrl = `grpcs://127.0.0.1:${a.grpcPort}`;
      const machine = generateMachineKey();
      const moving = new ControlClient({
        url: `${aUrl},${b.url}`,
        fingerprint: b.fingerprint,
        machineSecretKey: machine.secretKey,
      });
      while (!moving.display.endsWith(`:${a.grpcPort}`)) moving.failover();
      let netmap: NetMap | null = null;
      session = new ControlSession(
        moving,
        {
          authKey: () => key,
          nodePublic: generateNodeKey().publicKey,
          machinePublic: machine.publicKey,
          hostname: 'x',
          os: 'linux',
          version: '0.1.0',
          requestedTags: [],
          advertisedRoutes: [],
          endpoints: () => ['192.0.2.20:41641'],
          lockdownPorts: [],
        },
        false,
      );
      session.on('netmap', (m) => {
        netmap = m;
      });
      await session.start();
      const peerName = () => (netmap as NetMap | null)?.peers.find((p) => p.id === y.id)?.name;
      await until(() => session!.state === 'connected' && peerName() === 'y', 10_000, 'x connected to a');
      const xId = moving.nodeId;
      await until(() => b.c.state.isOnline(xId), 5000, 'x online as b sees it');

      // Acknowledged by a, then a dies at once.
      const admin = await connectAdmin({ socket: join(aDir, 'admin.sock'), output: 'json' });
      await admin.call('renameNode', { id: y.id, project: 'failover', name: 'acked' });
      admin.close();
      const killed = Date.now();
      await stop(a.proc, 'SIGKILL');

      await until(
        () => session!.state === 'connected' && peerName() === 'acked' && b.c.mapper.hasSession(xId),
        10_000,
        'x back on b with the acknowledged change',
      );
      const failover = Date.now() - killed;
      t.diagnostic(`x was back on b ${failover} ms after the kill`);
      assert.ok(failover < 10_000, `x was back on b ${failover} ms after the kill`);
      assert.equal(b.c.state.getNode(y.id)?.name, 'acked');
      assert.ok(b.c.state.isOnline(xId));
    } finally {
      session?.stop();
      await stop(a.proc, 'SIGKILL');
      rmSync(tlsDir, { recursive: true, force: true });
      rmSync(aDir, { recursive: true, force: true });
    }
  });

  it('relays between two agents whose relay streams end on different coordinators', async () => {
    const tlsDir = mkdtempSync(join(tmpdir(), 'meshgate-ha-tls-'));
    await ensureTlsIdentity(tlsDir);
    const tls = { tlsKeyFile: join(tlsDir, 'tls.key'), tlsCertFile: join(tlsDir, 'tls.crt') };
    const pair: TestCoordinator[] = [];
    for (let i = 0; i < 2; i++) {
      const port = await freePort();
      const r = await startTestCoordinator({
        database: url,
        ...tls,
        grpcListen: `127.0.0.1:${port}`,
        replicaAddress: `grpcs://127.0.0.1:${port}`,
      });
      replicas.push(r);
      pair.push(r);
    }
    const streams: grpc.ClientDuplexStream<RelayRequest, RelayResponse>[] = [];
    try {
      const [p, q] = pair as [TestCoordinator, TestCoordinator];
      const key = await authKey(p, 'relay', { reusable: true });
      await until(() => q.c.state.getProject('relay') !== undefined, 5000, 'the project on q');
      const x = agentOn(p);
      await x.register(key, 'x');
      await x.connect();
      const y = agentOn(q);
      await y.register(key, 'y');
      await y.connect();
      await until(() => p.c.state.isOnline(y.id) && q.c.state.isOnline(x.id), 5000, 'both online on both');
      const got: string[] = [];
      const open = async (a: SimAgent) => {
        const s = await a.client.relay();
        s.on('error', () => {});
        streams.push(s);
        return s;
      };
      const fromX = await open(x);
      const toY = await open(y);
      toY.on('data', (m: RelayResponse) => {
        if (m.peerId === x.id) got.push(new TextDecoder().decode(m.payload));
      });
      // Datagrams are dropped while the stream between the coordinators opens: send until one arrives.
      await until(
        () => {
          fromX.write(
            create(RelayRequestSchema, { peerId: y.id, payload: new TextEncoder().encode('hello') }),
          );
          return got.includes('hello');
        },
        10_000,
        'a datagram from x (on p) at y (on q)',
      );

      // Only coordinators of the database, which can read its secret, may forward.
      const endpoint = await dial(p.url, { fingerprint: p.fingerprint });
      const client = makeClient(ReplicaService, endpoint.target, endpoint.credentials, endpoint.options);
      const md = new Metadata();
      md.set('authorization', 'Bearer not-the-secret');
      const refused = await new Promise<grpc.ServiceError | null>((resolve) => {
        // biome-ignore lint/suspicious/noExplicitAny: generic client methods are untyped
        const s = (client as any).forwardRelay(md, resolve) as grpc.ClientWritableStream<unknown>;
        s.write(create(ForwardRelayRequestSchema, { fromId: x.id, toId: y.id, payload: new Uint8Array(4) }));
        s.end();
      });
      client.close();
      assert.equal(refused?.code, grpcStatus.UNAUTHENTICATED);
      const refusal = p.logs
        .filter((l) => l.includes('"msg":"refused call"'))
        .map((l) => JSON.parse(l))
        .find((l) => l.api === 'replica');
      assert.deepEqual(
        { peer: refusal?.peer, method: refusal?.method, reason: refusal?.reason },
        { peer: '127.0.0.1', method: 'ForwardRelay', reason: 'not a coordinator of this database' },
        'a wrong secret is logged and counted like a wrong API key',
      );
      assert.ok(!p.logs.some((l) => l.includes('not-the-secret')), 'the secret tried is not logged');
    } finally {
      for (const s of streams) s.cancel();
      rmSync(tlsDir, { recursive: true, force: true });
    }
  });
});
