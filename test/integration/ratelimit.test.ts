// Registration attempts are limited per source address before any key is looked at.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

describe('registration rate limit', () => {
  let t: TestCoordinator;
  const agents: SimAgent[] = [];

  before(async () => {
    // One attempt per 1000 s after a burst of three: the bucket does not refill during the test.
    t = await startTestCoordinator({ registrationRate: { perSecond: 0.001, burst: 3 } });
  });
  after(async () => {
    for (const a of agents) a.close();
    await t.close();
  });

  it('refuses attempts beyond the burst with RESOURCE_EXHAUSTED, good key or not, and counts them', async () => {
    const key = await authKey(t, 'rl', { reusable: true });
    const agent = () => {
      const a = new SimAgent(t.url, t.fingerprint);
      agents.push(a);
      return a;
    };
    await agent().register(key, 'one');
    await assert.rejects(
      agent().register(`mgkey_auth_000000000000_${'A'.repeat(43)}`, 'bad'),
      /unknown auth key/,
    );
    await agent().register(key, 'two');
    await assert.rejects(agent().register(key, 'three'), (err: grpc.ServiceError) => {
      assert.equal(err.code, grpc.status.RESOURCE_EXHAUSTED);
      assert.match(err.details, /too many registration attempts from this address; wait and retry/);
      return true;
    });
    const names = (await t.admin.call('listNodes', { project: 'rl' })).nodes.map((n) => n.name).sort();
    assert.deepEqual(names, ['one', 'two']);
    const rejected = await t.c.metrics.rejectedRegistrations.get();
    assert.equal(rejected.values.find((v) => v.labels.reason === 'rate-limited')?.value, 1);
    assert.ok(
      t.logs.some((l) => l.includes('refused call') && l.includes('too many registration attempts')),
      'the refusal is logged for fail2ban',
    );
  });
});
