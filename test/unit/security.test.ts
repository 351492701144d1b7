// The checks that keep strangers out, each tested where it is made: the call
// verifier's clock window and nonce memory, API key expiry and revocation,
// single-use auth keys under concurrent use, and expired nodes.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { CallVerifier } from '../../coordinator/api/auth.js';
import { type RegisterInput, State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { encodeWgKey, generateMachineKey, generateNodeKey, type MachineKeyPair } from '../../proto/keys.js';
import { signCall } from '../../proto/signing.js';

const MINUTE = 60_000;
const SKEW = 2 * MINUTE;

function metadata(headers: object): grpc.Metadata {
  const md = new grpc.Metadata();
  for (const [k, v] of Object.entries(headers)) md.set(k, String(v));
  return md;
}

describe('security checks', () => {
  let store: Store;
  let state: State;
  let now = 1_800_000_000_000;
  let verifier: CallVerifier;

  before(async () => {
    store = await openStore({ url: ':memory:' });
    state = await State.load(store.db, { ephemeralTimeoutMs: MINUTE, now: () => now });
    verifier = new CallVerifier(state, { clockSkewMs: SKEW, now: () => now });
    await state.createProject('test', 'p');
  });
  after(async () => {
    await state.close();
    await store.close();
  });

  const authKey = async (reusable: boolean) =>
    (
      await state.keys.createAuthKey('test', {
        project: 'p',
        reusable,
        ephemeral: false,
        expiresInMs: MINUTE,
        tags: [],
        reason: '',
      })
    ).key;
  const registration = (key: string, machine: MachineKeyPair, hostname: string): RegisterInput => ({
    authKey: key,
    machineKey: Buffer.from(machine.publicKey).toString('hex'),
    nodeKey: encodeWgKey(generateNodeKey().publicKey),
    hostname,
    os: 'linux',
    version: '1',
    requestedTags: [],
    endpoints: [],
    advertisedRoutes: [],
  });
  const body = new Uint8Array([1, 2, 3]);
  const registerCall = (machine: MachineKeyPair, timestamp = now) =>
    metadata(signCall(machine.secretKey, '/Register', '', body, timestamp));
  const refusal = (re: RegExp) => (err: unknown) => {
    assert.match((err as Error).message, re);
    return true;
  };

  describe('call verifier', () => {
    it('refuses calls stamped too far in the past and in the future, and accepts the edges', () => {
      const m = generateMachineKey();
      for (const offset of [-10 * MINUTE, 10 * MINUTE, -SKEW - 1, SKEW + 1]) {
        assert.throws(
          () => verifier.verifyRegister(registerCall(m, now + offset), '/Register', body, m.publicKey),
          refusal(/off the coordinator's clock/),
          `a call ${offset} ms off is refused`,
        );
      }
      for (const offset of [-SKEW, SKEW]) {
        verifier.verifyRegister(registerCall(m, now + offset), '/Register', body, m.publicKey);
      }
    });

    it('remembers a nonce for as long as its call could be accepted, also across nonce sweeps', () => {
      const m = generateMachineKey();
      const call = registerCall(m);
      verifier.verifyRegister(call, '/Register', body, m.publicKey);
      // A sweep runs at most every 10 s: 11 s later one has run, and the call is still in its window.
      for (const later of [1_000, 11_000, 60_000, SKEW]) {
        now += later;
        try {
          assert.throws(
            () => verifier.verifyRegister(call, '/Register', body, m.publicKey),
            refusal(/replayed call/),
            `replayed ${later} ms later`,
          );
        } finally {
          now -= later;
        }
      }
      now += SKEW + 1;
      try {
        assert.throws(
          () => verifier.verifyRegister(call, '/Register', body, m.publicKey),
          refusal(/off the coordinator's clock/),
          'once the window has passed the timestamp refuses it',
        );
      } finally {
        now -= SKEW + 1;
      }
    });

    it('refuses a call of a node whose expiry time has come, and takes it again when cleared', async () => {
      const m = generateMachineKey();
      const { node } = await state.register(registration(await authKey(false), m, 'expiring'));
      const sync = () => metadata(signCall(m.secretKey, '/Sync', node.id, new Uint8Array(), now));
      assert.equal(verifier.verifyNode(sync(), '/Sync', new Uint8Array()).id, node.id);
      await state.expireNode('test', node.id, 'p', now);
      assert.throws(
        () => verifier.verifyNode(sync(), '/Sync', new Uint8Array()),
        refusal(/node expiring has expired; register again/),
      );
      await state.expireNode('test', node.id, 'p', null);
      assert.equal(verifier.verifyNode(sync(), '/Sync', new Uint8Array()).id, node.id);
    });
  });

  describe('API keys', () => {
    it('work until they expire, then are refused with what to do', async () => {
      const { record, key } = await state.keys.createApiKey('test', MINUTE, 'ci');
      assert.equal(await state.keys.authenticateApiKey(key), record.id);
      now += MINUTE - 1;
      try {
        assert.equal(await state.keys.authenticateApiKey(key), record.id, 'valid until the last ms');
        now += 1;
        await assert.rejects(
          state.keys.authenticateApiKey(key),
          refusal(new RegExp(`API key ${record.id} expired; create a new one`)),
        );
      } finally {
        now -= MINUTE;
      }
    });

    it('are refused once revoked, and rotation hands out a working key in place of the old', async () => {
      const { record, key } = await state.keys.createApiKey('test', 10 * MINUTE, 'ops');
      const rotated = await state.keys.rotateApiKey('test', record.id, null);
      assert.notEqual(rotated.record.id, record.id);
      assert.equal(rotated.record.description, 'ops');
      assert.equal(rotated.record.expiresAt - rotated.record.createdAt, 10 * MINUTE, 'same lifetime');
      await assert.rejects(
        state.keys.authenticateApiKey(key),
        refusal(new RegExp(`API key ${record.id} was expired`)),
      );
      assert.equal(await state.keys.authenticateApiKey(rotated.key), rotated.record.id);

      const revoked = await state.keys.expireApiKey('test', rotated.record.id);
      assert.equal(revoked.revokedAt, now);
      await assert.rejects(state.keys.authenticateApiKey(rotated.key), refusal(/was expired/));
      const again = await state.keys.expireApiKey('test', rotated.record.id);
      assert.equal(again.revokedAt, now, 'expiring twice keeps the first time');
      await assert.rejects(state.keys.expireApiKey('test', 'ffffffffffff'), refusal(/does not exist/));
      const listed = await state.keys.listApiKeys();
      assert.deepEqual(
        listed.filter((k) => k.id === record.id || k.id === rotated.record.id).map((k) => k.revokedAt),
        [now, now],
      );
    });
  });

  describe('auth keys', () => {
    it('let exactly one of eight machines racing for a single-use key join', async () => {
      const key = await authKey(false);
      const results = await Promise.allSettled(
        Array.from({ length: 8 }, (_, i) => state.register(registration(key, generateMachineKey(), `r${i}`))),
      );
      assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1, 'one machine joined');
      for (const r of results) {
        if (r.status === 'rejected') assert.match(String(r.reason), /single-use and was already used/);
      }
      const [record] = (await state.keys.listAuthKeys('p')).filter((k) => key.includes(`-${k.id}-`));
      assert.equal(record?.usedCount, 1);
      assert.equal(
        state.listNodes('p').filter((n) => /^r\d$/.test(n.name)).length,
        1,
        'the losers left no node behind',
      );
    });

    it('let a reusable key join every one of them and count each use', async () => {
      const key = await authKey(true);
      await Promise.all(
        Array.from({ length: 4 }, (_, i) => state.register(registration(key, generateMachineKey(), `u${i}`))),
      );
      const [record] = (await state.keys.listAuthKeys('p')).filter((k) => key.includes(`-${k.id}-`));
      assert.equal(record?.usedCount, 4);
    });
  });
});
