// The agent's control session against a coordinator running in this process (real TLS, real SQLite):
// what the agent reports in each state, and that it comes back by itself after an outage, an expiry
// or a deletion, and stays down after stop().
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import { ControlClient } from '../../agent/control/client.js';
import {
  AgentError,
  type ConnectionState,
  ControlSession,
  type RegistrationInfo,
} from '../../agent/control/session.js';
import { describeError } from '../../cli/errors.js';
import { RegisterResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import type { NetMap, Node } from '../../proto/gen/meshgate/v1/types_pb.js';
import { encodeWgKey, generateMachineKey, generateNodeKey } from '../../proto/keys.js';
import { authKey, startTestCoordinator, type TestCoordinator } from '../integration/harness.js';

async function until(what: string, pred: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

interface Agent {
  session: ControlSession;
  info: RegistrationInfo;
  states: [ConnectionState, string][];
  netmaps: NetMap[];
  registered: Node[];
}

function agent(t: TestCoordinator, hostname: string, key: () => string, haveIdentity = false): Agent {
  const machine = generateMachineKey();
  const client = new ControlClient({
    url: t.url,
    fingerprint: t.fingerprint,
    machineSecretKey: machine.secretKey,
  });
  const info: RegistrationInfo = {
    authKey: key,
    nodePublic: generateNodeKey().publicKey,
    machinePublic: machine.publicKey,
    hostname,
    os: 'linux',
    version: '0.9.1',
    requestedTags: [],
    advertisedRoutes: [],
    lockdownPorts: [22],
    endpoints: () => ['192.0.2.10:41641'],
  };
  const a: Agent = {
    session: new ControlSession(client, info, haveIdentity),
    info,
    states: [],
    netmaps: [],
    registered: [],
  };
  a.session.on('state', (s, detail) => a.states.push([s, detail]));
  a.session.on('netmap', (m) => a.netmaps.push(m));
  a.session.on('registered', (n) => a.registered.push(n));
  return a;
}

const names = (a: Agent) => a.states.map(([s]) => s).join(' ');

describe('control session against a coordinator', () => {
  let t: TestCoordinator;
  const running: Agent[] = [];
  const node = async (name: string) =>
    (await t.admin.call('listNodes', { project: 'sess' })).nodes.find((n) => n.name === name);

  before(async () => {
    t = await startTestCoordinator();
    await authKey(t, 'sess');
  });
  after(async () => {
    for (const a of running) a.session.stop();
    await t.close();
  });

  it('says why a first registration is refused, and does not retry', async () => {
    const a = agent(t, 'refused', () => 'mgk_not-a-key');
    await assert.rejects(a.session.start(), (err: Error) => {
      assert.ok(err instanceof AgentError);
      assert.match(err.message, /^registration refused: \S/);
      // An expected failure: the command prints this one line, no stack.
      assert.equal(describeError(err), err.message);
      return true;
    });
    assert.deepEqual(a.states, []);
    a.session.stop();
  });

  it('registers, connects and tells the coordinator its version, endpoints and lockdown ports', async () => {
    const key = await authKey(t, 'sess');
    const a = agent(t, 'm1', () => key);
    running.push(a);
    assert.equal(a.session.state, 'connecting');
    assert.equal(a.session.lastError, '');
    await a.session.start();
    await until('connected', () => a.session.state === 'connected');
    assert.equal(a.session.lastError, '');
    assert.deepEqual(
      a.registered.map((n) => n.name),
      ['m1'],
    );
    assert.equal(a.netmaps[0]?.self?.name, 'm1');
    await until('the hello on record', async () => (await node('m1'))?.online === true);
    const seen = await node('m1');
    assert.equal(seen?.version, '0.9.1');
    assert.deepEqual(seen?.endpoints, ['192.0.2.10:41641']);
    assert.deepEqual(seen?.lockdownPorts, [22]);

    a.session.sendEndpoints(['198.51.100.7:41641']);
    await until('the new endpoints on record', async () =>
      ((await node('m1'))?.endpoints ?? []).includes('198.51.100.7:41641'),
    );
  });

  it('gets a netmap when a peer joins, without leaving the connected state', async () => {
    const [m1] = running as [Agent];
    const before = m1.states.length;
    const key = await authKey(t, 'sess');
    const peer = agent(t, 'm2', () => key);
    running.push(peer);
    await peer.session.start();
    await until('m1 sees m2', () => m1.netmaps.at(-1)?.peers.some((p) => p.name === 'm2') === true);
    assert.equal(m1.states.length, before, `states: ${names(m1)}`);
  });

  it('names an expiry by an admin and says why the auth key at hand cannot bring it back', async () => {
    const [m1] = running as [Agent];
    m1.states.length = 0;
    await t.admin.call('expireNode', { id: 'm1', project: 'sess' });
    await until('expired', () => m1.session.state === 'expired', 8000);
    assert.match(m1.session.lastError, /^auth key refused: .*single-use/);
    assert.ok(!names(m1).includes('offline'), `states: ${names(m1)}`);
    // The stream's refusal is no outage: the agent registers again at once to learn why.
    assert.equal(m1.states[0]?.[0], 'connecting');
    assert.notEqual(m1.states[0]?.[1], '');
  });

  it('reports a missing auth key, a deletion while expired, and recovers with a new key', async () => {
    const [m1] = running as [Agent];
    let calls = 0;
    let missing = 'no auth key: write one to the key file';
    m1.info.authKey = () => {
      calls++;
      throw new Error(missing);
    };
    m1.session.retryNow();
    await until('the missing key reported', () => m1.session.lastError === missing);
    assert.equal(m1.session.state, 'expired');

    await t.admin.call('deleteNode', { id: 'm1', project: 'sess' });
    m1.session.retryNow();
    await until('deleted', () => m1.session.state === 'deleted');
    assert.equal(m1.session.lastError, missing);

    // The same refusal again changes nothing a user sees.
    const count = m1.states.length;
    const before = calls;
    m1.session.retryNow();
    await until('the auth key asked for', () => calls > before);
    await new Promise((r) => setImmediate(r));
    assert.equal(m1.states.length, count, `states: ${names(m1)}`);

    missing = 'no auth key: the key file is empty';
    m1.session.retryNow();
    await until('the new reason reported', () => m1.session.lastError === missing);

    const fresh = await authKey(t, 'sess');
    m1.info.authKey = () => fresh;
    m1.session.retryNow();
    await until('connected again', () => m1.session.state === 'connected', 3000);
    assert.equal(m1.registered.at(-1)?.name, 'm1');
    assert.equal((await node('m1'))?.online, true);
  });

  it('names a deletion while connected', async () => {
    const [m1] = running as [Agent];
    m1.states.length = 0;
    m1.info.authKey = () => {
      throw new Error('no auth key: write one to the key file');
    };
    await t.admin.call('deleteNode', { id: 'm1', project: 'sess' });
    await until('deleted', () => m1.session.state === 'deleted', 8000);
    assert.equal(m1.session.lastError, 'no auth key: write one to the key file');
    assert.ok(!names(m1).includes('offline'), `states: ${names(m1)}`);
  });

  it('leaves for good on logout: the coordinator deletes the node', async () => {
    const key = await authKey(t, 'sess');
    const m3 = agent(t, 'm3', () => key);
    await m3.session.start();
    await until('connected', () => m3.session.state === 'connected');
    await m3.session.logout();
    m3.session.stop();
    assert.equal(await node('m3'), undefined);
  });

  it('retries a first registration that cannot reach the coordinator instead of refusing it', async () => {
    const a = agent({ ...t, url: 'grpcs://127.0.0.1:1' }, 'far', () => 'mgk_key');
    await a.session.start();
    assert.equal(a.session.state, 'offline');
    assert.notEqual(a.session.lastError, '');
    // Without a stream there is nobody to tell; an update report is lost, a failure told again later.
    a.session.sendEndpoints(['192.0.2.1:41641']);
    a.session.sendUpdate('1.0.0', 'updating', '');
    // retryNow is for a new auth key while revoked; an outage keeps its backoff.
    let reads = 0;
    a.info.endpoints = () => {
      reads++;
      return [];
    };
    a.session.retryNow();
    assert.equal(reads, 0);
    a.session.stop();
  });

  it('names a node the coordinator no longer knows as deleted already at start', async () => {
    const a = agent(
      t,
      'ghost',
      () => {
        throw new Error('no auth key: write one to the key file');
      },
      true,
    );
    await a.session.start();
    assert.equal(a.session.state, 'deleted');
    assert.equal(a.session.lastError, 'no auth key: write one to the key file');
    a.session.stop();
    // A registration starts by reading the endpoints; after stop() none starts, not even when asked.
    let reads = 0;
    a.info.endpoints = () => {
      reads++;
      return [];
    };
    a.session.retryNow();
    assert.equal(reads, 0);
  });

  it('tells a failed self-update after every hello, and how an update goes', async () => {
    await authKey(t, 'upd');
    await t.admin.call('setDesiredVersion', {
      project: 'upd',
      version: '1.0.0',
      artifactUrl: 'https://releases.example/meshgate-1.0.0.tar.gz',
      sha256: 'b'.repeat(64),
      maxUnavailable: 10,
    });
    const updates = async (name: string) =>
      (await t.admin.call('listDesiredVersions', { project: 'upd' })).nodes.find((n) => n.name === name);
    const [k1, k2] = [await authKey(t, 'upd'), await authKey(t, 'upd')];
    const failed = agent(t, 'u1', () => k1);
    failed.info.updateFailure = () => ({ version: '1.0.0', reason: 'health check failed after the restart' });
    const fine = agent(t, 'u2', () => k2);
    fine.info.updateFailure = () => null;
    try {
      await failed.session.start();
      await fine.session.start();
      await until('the failure on record', async () => (await updates('u1'))?.state === 'failed');
      assert.equal((await updates('u1'))?.reason, 'health check failed after the restart');
      await until('u2 online', async () => (await updates('u2'))?.online === true);
      assert.notEqual((await updates('u2'))?.state, 'failed', 'nothing failed, nothing told');

      fine.session.sendUpdate('1.0.0', 'updating', '');
      await until('the update on record', async () => (await updates('u2'))?.state === 'updating');
      fine.session.sendUpdate('1.0.0', 'failed', 'download refused: checksum mismatch');
      await until('the failure on record', async () => (await updates('u2'))?.state === 'failed');
      assert.equal((await updates('u2'))?.reason, 'download refused: checksum mismatch');
    } finally {
      failed.session.stop();
      fine.session.stop();
    }
  });

  it('stays down after stop(): the coordinator sees it go, and no state follows', async () => {
    const peer = running[1]!;
    const count = peer.states.length;
    peer.session.stop();
    await until('m2 offline at the coordinator', async () => (await node('m2'))?.online === false);
    peer.session.retryNow();
    assert.equal(peer.states.length, count, `states after stop: ${names(peer)}`);
  });
});

describe('control session through a coordinator outage', () => {
  it('goes offline with the reason, and reconnects when the coordinator is back', async () => {
    const first = await startTestCoordinator();
    let t = first;
    const key = await authKey(t, 'sess');
    const a = agent(t, 'm1', () => key);
    try {
      await a.session.start();
      await until('connected', () => a.session.state === 'connected');
      // A key rotated while the coordinator is away is the one the next registration presents.
      const rotated = generateNodeKey().publicKey;
      a.session.setNodeKey(rotated);
      first.admin.close();
      await first.c.close();
      await until('offline', () => a.session.state === 'offline');
      assert.notEqual(a.session.lastError, '');
      t = await startTestCoordinator({ dataDir: first.dataDir, grpcListen: `127.0.0.1:${first.c.grpcPort}` });
      await until('connected again', () => a.session.state === 'connected', 10_000);
      assert.equal(a.session.lastError, '');
      assert.deepEqual(a.states.slice(-2), [
        ['connecting', ''],
        ['connected', ''],
      ]);
      assert.equal(a.registered.length, 2, 'registered again before the new stream');
      const [seen] = (await t.admin.call('listNodes', { project: 'sess' })).nodes;
      assert.equal(seen?.nodeKey, encodeWgKey(rotated));
    } finally {
      a.session.stop();
      await t.close();
    }
  });
});

describe('control session with a coordinator that answers without a node', () => {
  it('refuses to go on, saying what the coordinator did', async () => {
    const client = {
      register: async () => create(RegisterResponseSchema, {}),
      close() {},
    } as unknown as ControlClient;
    const session = new ControlSession(
      client,
      {
        authKey: () => 'mgk_key',
        nodePublic: new Uint8Array(32),
        machinePublic: new Uint8Array(32),
        hostname: 'h',
        os: 'linux',
        version: '1',
        requestedTags: [],
        advertisedRoutes: [],
        lockdownPorts: [],
        endpoints: () => [],
      },
      false,
    );
    await assert.rejects(session.start(), {
      name: 'AgentError',
      message: 'registration refused: coordinator answered registration without a node',
    });
    session.stop();
  });
});
