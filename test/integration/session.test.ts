// The agent's control session against a real coordinator: an admin's expire or delete is named as
// such (never as an outage), a refused key says why, and a new key brings the node back.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { ControlClient } from '../../agent/control/client.js';
import { type ConnectionState, ControlSession } from '../../agent/control/session.js';
import { generateMachineKey, generateNodeKey } from '../../proto/keys.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

describe('control session states', () => {
  let t: TestCoordinator;
  let session: ControlSession;
  let key = '';
  const states: [ConnectionState, string][] = [];

  const waitState = async (want: ConnectionState, timeoutMs = 5000) => {
    const deadline = Date.now() + timeoutMs;
    while (session.state !== want) {
      if (Date.now() > deadline)
        throw new Error(`no ${want} state; states: ${states.map((s) => s[0]).join(' ')}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };

  before(async () => {
    t = await startTestCoordinator();
    key = await authKey(t, 'st');
    const machine = generateMachineKey();
    const client = new ControlClient({
      url: t.url,
      fingerprint: t.fingerprint,
      machineSecretKey: machine.secretKey,
    });
    session = new ControlSession(
      client,
      {
        authKey: () => key,
        nodePublic: generateNodeKey().publicKey,
        machinePublic: machine.publicKey,
        hostname: 'm1',
        os: 'linux',
        version: '0.1.0',
        requestedTags: [],
        advertisedRoutes: [],
        lockdownPorts: [],
        endpoints: () => [],
      },
      false,
    );
    session.on('state', (s, detail) => states.push([s, detail]));
    await session.start();
    await waitState('connected');
  });
  after(async () => {
    session.stop();
    await t.close();
  });

  it('expired by an admin with a spent single-use key: expired, with the refusal, never offline', async () => {
    states.length = 0;
    await t.admin.call('expireNode', { id: 'm1', project: 'st' });
    await waitState('expired');
    assert.match(session.lastError, /auth key refused: .*single-use/);
    assert.ok(!states.some(([s]) => s === 'offline'), `states: ${states.map((s) => s[0]).join(' ')}`);
  });

  it('a new key brings it back at once', async () => {
    key = await authKey(t, 'st');
    session.retryNow();
    await waitState('connected', 2000);
  });

  it('deleted by an admin: deleted, never offline', async () => {
    states.length = 0;
    await t.admin.call('deleteNode', { id: 'm1', project: 'st' });
    await waitState('deleted');
    assert.ok(!states.some(([s]) => s === 'offline'), `states: ${states.map((s) => s[0]).join(' ')}`);
  });

  it('logout deletes a node that is not ephemeral', async () => {
    const a = new SimAgent(t.url, t.fingerprint);
    await a.register(await authKey(t, 'st'), 'keeper');
    await a.client.logout();
    const names = (await t.admin.call('listNodes', { project: 'st' })).nodes.map((n) => n.name);
    assert.ok(!names.includes('keeper'), `nodes: ${names.join(', ')}`);
    a.close();
  });
});
