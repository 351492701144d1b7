// The checks that keep strangers out, each tested where it is made: the call
// verifier's clock window and nonce memory, API key expiry and revocation,
// single-use auth keys under concurrent use, and expired nodes.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { adminActor, CallVerifier, LOCAL_ACTOR } from '../../coordinator/api/auth.js';
import { parseSecret } from '../../coordinator/state/secrets.js';
import { type RegisterInput, State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import {
  encodeWgKey,
  generateMachineKey,
  generateNodeKey,
  type MachineKeyPair,
  sha256,
} from '../../proto/keys.js';
import {
  PublicKeyCache,
  SIG_MACHINE_KEY,
  SIG_NODE_ID,
  SIG_NONCE,
  SIG_SIGNATURE,
  SIG_TIMESTAMP,
  signCall,
  signingPayload,
  verifyCallSignature,
} from '../../proto/signing.js';
import { testAuthKey } from '../fixtures/nodes.js';

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

  const authKey = (reusable: boolean) => testAuthKey(state.keys, 'p', { reusable });
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

    it('says how far off the clock of a refused call is, and which way', () => {
      const m = generateMachineKey();
      for (const [offset, shown] of [
        [10 * MINUTE, '600s'],
        [-10 * MINUTE, '-600s'],
      ] as const) {
        assert.throws(
          () => verifier.verifyRegister(registerCall(m, now + offset), '/Register', body, m.publicKey),
          refusal(
            new RegExp(`call timestamp is ${shown} off the coordinator's clock; fix the clock \\(NTP\\)`),
          ),
        );
      }
    });

    it('refuses unsigned, malformed, forged and tampered calls, each with its reason', () => {
      const m = generateMachineKey();
      const good = () =>
        signCall(m.secretKey, '/Register', '', body, now) as unknown as Record<string, string>;
      const check = (headers: Record<string, string>, re: RegExp, b = body, method = '/Register') =>
        assert.throws(() => verifier.verifyRegister(metadata(headers), method, b, m.publicKey), refusal(re));
      check({}, /^call is not signed$/);
      const without = (name: string) => {
        const h = good();
        delete h[name];
        return h;
      };
      check(without(SIG_SIGNATURE), /^call is not signed$/);
      check(without(SIG_NONCE), /^call is not signed$/);
      check(without(SIG_TIMESTAMP), /^call is not signed$/);
      check({ ...good(), [SIG_TIMESTAMP]: 'soon' }, /^call is not signed$/);
      check({ ...good(), [SIG_NONCE]: `x${good()[SIG_NONCE]!.slice(1)}` }, /^call is not signed$/);
      check({ ...good(), [SIG_NONCE]: `${good()[SIG_NONCE]}0` }, /^call is not signed$/, body);
      check({ ...good(), [SIG_NONCE]: `0${good()[SIG_NONCE]}` }, /^call is not signed$/, body);
      check(without(SIG_MACHINE_KEY), /^call signed with another machine key$/);
      const forger = generateMachineKey();
      check(
        signCall(forger.secretKey, '/Register', '', body, now) as unknown as Record<string, string>,
        /^call signed with another machine key$/,
      );
      check(good(), /^bad call signature$/, new Uint8Array([9]));
      check(good(), /^bad call signature$/, body, '/Logout');
      check({ ...good(), [SIG_TIMESTAMP]: String(now + 1) }, /^bad call signature$/);
      const forged = good();
      const other = signCall(m.secretKey, '/Register', '', new Uint8Array([9]), now) as unknown as Record<
        string,
        string
      >;
      check({ ...forged, [SIG_SIGNATURE]: other[SIG_SIGNATURE]! }, /^bad call signature$/);
      verifier.verifyRegister(metadata(good()), '/Register', body, m.publicKey);
    });

    it('refuses a node call without a node id, for an unknown node, or signed for another node', async () => {
      const m = generateMachineKey();
      const { node } = await state.register(registration(await authKey(false), m, 'caller'));
      const call = (nodeId: string, signer = m) =>
        metadata(signCall(signer.secretKey, '/Sync', nodeId, new Uint8Array(), now));
      assert.throws(
        () => verifier.verifyNode(call(''), '/Sync', new Uint8Array()),
        refusal(/^unknown node: it was deleted or never registered; register again$/),
      );
      assert.throws(
        () => verifier.verifyNode(call('0000000000000000'), '/Sync', new Uint8Array()),
        refusal(/^unknown node/),
      );
      const headers = signCall(
        m.secretKey,
        '/Sync',
        'someone-else',
        new Uint8Array(),
        now,
      ) as unknown as Record<string, string>;
      assert.throws(
        () =>
          verifier.verifyNode(metadata({ ...headers, [SIG_NODE_ID]: node.id }), '/Sync', new Uint8Array()),
        refusal(/^bad call signature$/),
        'the node id is part of what is signed',
      );
      assert.throws(
        () => verifier.verifyNode(call(node.id, generateMachineKey()), '/Sync', new Uint8Array()),
        refusal(/^call signed with another machine key$/),
      );
      assert.equal(verifier.verifyNode(call(node.id), '/Sync', new Uint8Array()).id, node.id);
    });

    it('forgets nonces once their calls are out of the clock window, at most every 10 s', () => {
      const fresh = new CallVerifier(state, { clockSkewMs: SKEW, now: () => now });
      const remembered = () => (fresh as unknown as { seen: Map<string, number> }).seen.size;
      const m = generateMachineKey();
      const call = () => {
        const md = registerCall(m);
        fresh.verifyRegister(md, '/Register', body, m.publicKey);
        return md;
      };
      const t0 = now;
      try {
        const a = call();
        now = t0 + 5_000;
        call();
        now = t0 + SKEW;
        assert.throws(
          () => fresh.verifyRegister(a, '/Register', body, m.publicKey),
          refusal(/replayed call/),
          'on the last ms of its window a call is still remembered, though a sweep ran',
        );
        now = t0 + SKEW + 1;
        call();
        assert.equal(remembered(), 3, 'no sweep within 10 s of the last one');
        now = t0 + SKEW + 10_000;
        call();
        assert.equal(remembered(), 2, '10 s later the first two are forgotten');
      } finally {
        now = t0;
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
    it('name the caller, from the local socket or a bearer key, and refuse anything else', async () => {
      const { record, key } = await state.keys.createApiKey('test', MINUTE, 'admin');
      assert.equal(LOCAL_ACTOR, 'local-socket');
      assert.equal((await adminActor(state, undefined, true)).actor, 'local-socket');
      assert.equal((await adminActor(state, `Bearer ${key}`, false)).actor, `apikey:${record.id}`);
      assert.equal((await adminActor(state, `bearer   ${key}`, false)).actor, `apikey:${record.id}`);
      await assert.rejects(
        adminActor(state, undefined, false),
        refusal(/^missing API key: pass --api-key or set MESHGATE_API_KEY$/),
      );
      await assert.rejects(adminActor(state, '', false), refusal(/^missing API key/));
      for (const bad of [key, `Basic ${key}`, `Bearer ${key} extra`, `Bearer${key}`, `xBearer ${key}`]) {
        await assert.rejects(
          adminActor(state, bad, false),
          refusal(/^authorization must be "Bearer <api key>"$/),
          bad.replace(key, 'KEY'),
        );
      }
      const wrong = `${key.slice(0, -1)}${key.endsWith('A') ? 'B' : 'A'}`;
      await assert.rejects(adminActor(state, `Bearer ${wrong}`, false), refusal(/^unknown API key$/));
    });

    it('work until they expire, then are refused with what to do', async () => {
      const { record, key } = await state.keys.createApiKey('test', MINUTE, 'ci');
      assert.equal((await state.keys.authenticateApiKey(key)).id, record.id);
      now += MINUTE - 1;
      try {
        assert.equal((await state.keys.authenticateApiKey(key)).id, record.id, 'valid until the last ms');
        now += 1;
        await assert.rejects(
          state.keys.authenticateApiKey(key),
          refusal(new RegExp(`API key ${record.id} expired; create a new one`)),
        );
      } finally {
        now -= MINUTE;
      }
    });

    it('record when they were last used, writing at most once a minute per key', async () => {
      const { record, key } = await state.keys.createApiKey('test', 10 * MINUTE, 'seen');
      const lastSeen = async () => (await state.keys.listApiKeys()).find((k) => k.id === record.id)?.lastSeen;
      assert.equal(await lastSeen(), null, 'never used');
      assert.equal((await state.keys.listApiKeys()).find((k) => k.id === record.id)?.revokedAt, null);
      const t0 = now;
      try {
        await state.keys.authenticateApiKey(key);
        assert.equal(await lastSeen(), t0);
        now = t0 + MINUTE;
        await state.keys.authenticateApiKey(key);
        assert.equal(await lastSeen(), t0, 'not written again within the minute');
        now = t0 + MINUTE + 1;
        await state.keys.authenticateApiKey(key);
        assert.equal(await lastSeen(), t0 + MINUTE + 1);
      } finally {
        now = t0;
      }
      await assert.rejects(
        state.keys.expireApiKey('test', '000000000000'),
        refusal(/^API key 000000000000 does not exist$/),
      );
      await assert.rejects(
        state.keys.rotateApiKey('test', '000000000000', null),
        refusal(/^API key 000000000000 does not exist$/),
      );
      const audited = async () =>
        (await store.db.selectFrom('audit_log').select('id').where('target', '=', '000000000000').execute())
          .length;
      assert.equal(await audited(), 0, 'nothing audited for a key that does not exist');
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
      assert.equal((await state.keys.authenticateApiKey(rotated.key)).id, rotated.record.id);

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
    it('are refused when expired (from their last ms on), revoked, malformed or unknown, with the reason', async () => {
      const key = await authKey(false);
      const id = parseSecret('auth', key)!.id;
      const m = generateMachineKey();
      const t0 = now;
      try {
        now = t0 + MINUTE;
        await assert.rejects(
          state.register(registration(key, m, 'late')),
          refusal(new RegExp(`^auth key ${id} expired; ask for a new one$`)),
        );
        now = t0 + MINUTE - 1;
        const revoked = await state.keys.expireAuthKey('test', id);
        assert.equal(revoked.revokedAt, now);
        now += 1;
        assert.equal(
          (await state.keys.expireAuthKey('test', id)).revokedAt,
          now - 1,
          'expiring twice keeps the first time',
        );
        now = t0;
        await assert.rejects(
          state.register(registration(key, m, 'revoked')),
          refusal(new RegExp(`^auth key ${id} was expired by an admin$`)),
        );
      } finally {
        now = t0;
      }
      await assert.rejects(
        state.register(registration('mgkey_auth_short', m, 'x')),
        refusal(/^malformed auth key \(expected mgkey_auth_…\)$/),
      );
      await assert.rejects(
        state.keys.expireAuthKey('test', '000000000000'),
        refusal(/^auth key 000000000000 does not exist$/),
      );
    });

    it('are made only with valid tags and a lifetime from 1 ms to 3650 days, and audited', async () => {
      const DAY = 86_400_000;
      const create = (tags: string[], expiresInMs: number) =>
        state.keys.createAuthKey('alice', {
          project: 'p',
          reusable: true,
          ephemeral: false,
          expiresInMs,
          tags,
          reason: 'rack 7',
        });
      await assert.rejects(create(['ops'], MINUTE), refusal(/^"ops" is not a tag \(tag:NAME/));
      for (const bad of [0, -1, 3650 * DAY + 1]) {
        await assert.rejects(create([], bad), refusal(/^expiration must be between 1s and 3650d$/), `${bad}`);
        await assert.rejects(
          state.keys.createApiKey('alice', bad, ''),
          refusal(/^expiration must be between 1s and 3650d$/),
        );
      }
      await create([], 3650 * DAY);
      await state.keys.createApiKey('alice', 3650 * DAY, '');
      await create([], 1);
      await state.keys.createApiKey('alice', 1, '');
      const { record } = await create(['tag:b', 'tag:a', 'tag:b'], MINUTE);
      assert.deepEqual(record.tags, ['tag:a', 'tag:b'], 'sorted, without repeats');
      await state.keys.expireAuthKey('bob', record.id);
      const api = await state.keys.createApiKey('alice', MINUTE, 'deploys');
      await state.keys.expireApiKey('bob', api.record.id);
      const rows = await store.db
        .selectFrom('audit_log')
        .select(['actor', 'action', 'target', 'detail'])
        .where('target', 'in', [record.id, api.record.id])
        .orderBy('id')
        .execute();
      assert.deepEqual(
        rows.map((r) => [r.actor, r.action, r.target, JSON.parse(r.detail)]),
        [
          [
            'alice',
            'authkey.create',
            record.id,
            { project: 'p', reusable: true, ephemeral: false, tags: ['tag:a', 'tag:b'], reason: 'rack 7' },
          ],
          ['bob', 'authkey.expire', record.id, { project: 'p' }],
          [
            'alice',
            'apikey.create',
            api.record.id,
            { description: 'deploys', expiresAt: now + MINUTE, projects: null, readOnly: false },
          ],
          ['bob', 'apikey.expire', api.record.id, {}],
        ],
      );
    });

    it('let exactly one of eight machines racing for a single-use key join', async () => {
      const key = await authKey(false);
      const results = await Promise.allSettled(
        Array.from({ length: 8 }, (_, i) => state.register(registration(key, generateMachineKey(), `r${i}`))),
      );
      assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1, 'one machine joined');
      for (const r of results) {
        if (r.status === 'rejected') assert.match(String(r.reason), /single-use and was already used/);
      }
      const [record] = (await state.keys.listAuthKeys('p')).filter(
        (k) => k.id === parseSecret('auth', key)!.id,
      );
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
      const [record] = (await state.keys.listAuthKeys('p')).filter(
        (k) => k.id === parseSecret('auth', key)!.id,
      );
      assert.equal(record?.usedCount, 4);
    });
  });

  describe('call signatures', () => {
    const call = {
      method: '/meshgate.v1.ControlService/Sync',
      nodeId: 'ab12',
      timestamp: 1_800_000_000_123,
      nonce: '00112233445566778899aabbccddeeff',
      bodyHash: new Uint8Array([0xde, 0xad, 0xbe, 0xef]),
    };

    it('sign a payload whose format agents and coordinators of any version agree on', () => {
      assert.equal(
        new TextDecoder().decode(signingPayload(call)),
        'meshgate-call-v1\n/meshgate.v1.ControlService/Sync\nab12\n1800000000123\n00112233445566778899aabbccddeeff\ndeadbeef',
      );
    });

    it('keep parsed keys up to their limit, dropping the oldest first', () => {
      const [a, b, c] = [0, 1, 2].map(() => generateMachineKey().publicKey) as [
        Uint8Array,
        Uint8Array,
        Uint8Array,
      ];
      const cache = new PublicKeyCache(2);
      const first = cache.get(a);
      assert.equal(cache.get(a), first, 'a key seen before is not parsed again');
      const second = cache.get(b);
      assert.equal(cache.size, 2);
      const third = cache.get(c);
      assert.equal(cache.size, 2, 'a caller inventing keys cannot grow the cache');
      // A kept key comes back as the object parsed before; a dropped one is parsed anew.
      assert.deepEqual(
        [cache.get(b) === second, cache.get(c) === third, cache.get(a) === first],
        [true, true, false],
      );
      assert.deepEqual(cache.get(c).export({ format: 'jwk' }), {
        kty: 'OKP',
        crv: 'Ed25519',
        x: Buffer.from(c).toString('base64url'),
      });
    });

    it('say no, without throwing, to signatures and keys of the wrong length', () => {
      const m = generateMachineKey();
      const h = signCall(m.secretKey, call.method, call.nodeId, body, call.timestamp);
      const signed = { ...call, nonce: h['mg-nonce'], bodyHash: sha256(body) };
      assert.equal(verifyCallSignature(signed, h['mg-signature'], m.publicKey), true);
      const sig = Buffer.from(h['mg-signature'], 'base64');
      assert.equal(verifyCallSignature(signed, sig.subarray(0, 63).toString('base64'), m.publicKey), false);
      assert.equal(
        verifyCallSignature(signed, Buffer.concat([sig, Buffer.from([0])]).toString('base64'), m.publicKey),
        false,
      );
      assert.equal(verifyCallSignature(signed, '', m.publicKey), false);
      assert.equal(verifyCallSignature(signed, h['mg-signature'], m.publicKey.subarray(0, 31)), false);
      assert.equal(
        verifyCallSignature(signed, h['mg-signature'], new Uint8Array([...m.publicKey, 0])),
        false,
      );
    });
  });
});
