import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import SQLite from 'better-sqlite3-multiple-ciphers';
import { Kysely, SqliteDialect, sql } from 'kysely';
import { peerAddress } from '../../coordinator/api/auth.js';
import { RateLimiter } from '../../coordinator/api/ratelimit.js';
import { isCidr, isEndpoint } from '../../coordinator/api/validate.js';
import { loadConfig } from '../../coordinator/config.js';
import { AddressPool, ipv4ForIndex, ipv6ForIndex, MAX_INDEX } from '../../coordinator/state/ipam.js';
import { hashSecret, issueSecret, parseSecret, secretMatches } from '../../coordinator/state/secrets.js';
import { type RegisterInput, State, type StateEvent } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import { migrate } from '../../coordinator/store/migrations.js';
import { formatDuration, parseDuration } from '../../proto/duration.js';
import { encodeWgKey, generateMachineKey, generateNodeKey, sha256 } from '../../proto/keys.js';
import { toDnsLabel } from '../../proto/names.js';
import { signCall, verifyCallSignature } from '../../proto/signing.js';

describe('secrets', () => {
  it('issues keys in the documented format and stores only a hash', () => {
    const s = issueSecret('auth');
    assert.match(s.key, /^mgkey_auth_[0-9a-f]{12}_[A-Za-z0-9]{43}$/);
    const parsed = parseSecret('auth', s.key)!;
    assert.equal(parsed.id, s.id);
    assert.equal(s.hash, hashSecret(parsed.secret));
    assert.ok(!s.hash.includes(parsed.secret));
    assert.ok(secretMatches(parsed.secret, s.hash));
    const other = parsed.secret.endsWith('A') ? 'B' : 'A';
    assert.ok(
      !secretMatches(`${parsed.secret.slice(0, -1)}${other}`, s.hash),
      'one character off is refused',
    );
  });
  it('makes keys of letters, digits and _ only, so a double-click selects them whole', () => {
    for (let i = 0; i < 500; i++) {
      const s = issueSecret(i % 2 ? 'api' : 'auth');
      assert.match(s.key, /^\w+$/);
      assert.match(parseSecret(i % 2 ? 'api' : 'auth', s.key)!.secret, /^[A-Za-z0-9]{43}$/);
    }
  });
  it('still accepts keys issued in the dashed form with base64url secrets, and their stored hashes', () => {
    const secret = `Ab-_${'x'.repeat(38)}-`;
    const parsed = parseSecret('api', `mgkey-api-0123456789ab-${secret}`)!;
    assert.deepEqual(parsed, { id: '0123456789ab', secret });
    assert.ok(secretMatches(parsed.secret, hashSecret(secret)));
  });
  it('draws every secret character uniformly, with no letter favoured', () => {
    const counts = new Map<string, number>();
    const keys = 2000;
    for (let i = 0; i < keys; i++) {
      const { secret } = parseSecret('api', issueSecret('api').key)!;
      for (const c of secret) counts.set(c, (counts.get(c) ?? 0) + 1);
    }
    assert.equal(counts.size, 62, 'all of A-Z, a-z and 0-9 occur');
    const mean = (keys * 43) / 62;
    const most = Math.max(...counts.values());
    // Uniform counts stay within 7 % of the mean (about 2.5 standard deviations); folding the bytes
    // 248..255 onto the first 8 letters would give them 25 % more.
    assert.ok(most < mean * 1.15, `most frequent character drawn ${most} times, mean ${mean.toFixed(0)}`);
  });
  it('takes a key with the newline of a key file, but not one embedded in other text', () => {
    const s = issueSecret('auth');
    assert.equal(parseSecret('auth', ` ${s.key}\n`)?.id, s.id);
    assert.equal(parseSecret('auth', `x${s.key}`), null);
    assert.equal(parseSecret('auth', `${s.key}x`), null);
    const dashed = `mgkey-auth-0123456789ab-${'a'.repeat(43)}`;
    assert.equal(parseSecret('auth', dashed)?.id, '0123456789ab');
    assert.equal(parseSecret('auth', `x${dashed}`), null);
    assert.equal(parseSecret('auth', `${dashed}x`), null);
  });
  it('refuses a stored hash of another length instead of throwing', () => {
    const s = issueSecret('auth');
    const { secret } = parseSecret('auth', s.key)!;
    assert.equal(secretMatches(secret, s.hash.slice(0, 32)), false);
    assert.equal(secretMatches(secret, ''), false);
  });
  it('does not accept one kind of key for another', () => {
    assert.equal(parseSecret('api', issueSecret('auth').key), null);
    assert.equal(parseSecret('auth', 'mgkey_auth_short'), null);
    assert.equal(
      parseSecret('auth', `mgkey_auth_0123456789ab_${'a'.repeat(42)}-`),
      null,
      'no dash in the new form',
    );
  });
});

describe('address pool', () => {
  it('maps an index to both families', () => {
    assert.equal(ipv4ForIndex(1), '100.64.0.1');
    assert.equal(ipv4ForIndex(256), '100.64.1.0');
    assert.equal(ipv4ForIndex(MAX_INDEX), '100.127.255.254');
    assert.equal(ipv6ForIndex(1), 'fd7a:115c:a1e0::1');
    assert.equal(ipv6ForIndex(65536 + 2), 'fd7a:115c:a1e0::1:2');
  });
  it('never hands out an index twice and reuses freed ones only after wrapping', () => {
    const pool = new AddressPool([1, 2, 5]);
    assert.equal(pool.reserve(), 6);
    pool.release(2);
    assert.equal(pool.reserve(), 7, 'a freed address is not reused at once');
    const seen = new Set([1, 5, 6, 7]);
    for (let i = 0; i < 1000; i++) {
      const x = pool.reserve();
      assert.ok(!seen.has(x));
      seen.add(x);
    }
    const nearEnd = new AddressPool([1, 2, 3, MAX_INDEX - 1]);
    nearEnd.release(2);
    assert.equal(nearEnd.reserve(), MAX_INDEX, 'the last fresh address before the freed one');
    assert.equal(nearEnd.reserve(), 2, 'after wrapping, the freed address is the first free one');
    assert.equal(nearEnd.reserve(), 4);
  });
});

describe('coordinator configuration', () => {
  it('takes the Headscale listener from the file, the environment or a flag', () => {
    const dir = mkdtempSync(join(tmpdir(), 'meshgate-config-'));
    try {
      const file = join(dir, 'coordinator.yaml');
      writeFileSync(file, 'headscaleListen: ":50443"\nheadscaleInsecure: true\n');
      const c = loadConfig(file, {}, {});
      assert.deepEqual([c.headscaleListen, c.headscaleInsecure], [':50443', true]);
      assert.equal(loadConfig(undefined, {}, {}).headscaleListen, undefined, 'off by default');
      assert.equal(
        loadConfig(file, { MESHGATE_HEADSCALE_LISTEN: '10.0.0.1:50443' }, {}).headscaleListen,
        '10.0.0.1:50443',
      );
      assert.throws(
        () => loadConfig(undefined, {}, { headscaleListen: 'nope' }),
        /headscaleListen: expected HOST:PORT/,
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('durations', () => {
  it('parses what people type', () => {
    assert.equal(parseDuration('90s'), 90_000);
    assert.equal(parseDuration('1h30m'), 5_400_000);
    assert.equal(parseDuration('90d'), 90 * 86_400_000);
    assert.throws(() => parseDuration('soon'), /invalid duration "soon"/);
    assert.throws(() => parseDuration('5'), /invalid duration/);
    assert.equal(formatDuration(5_400_000), '1h30m');
  });
});

describe('network input checks', () => {
  it('accepts endpoints and CIDRs and refuses junk', () => {
    assert.ok(isEndpoint('192.0.2.1:41641'));
    assert.ok(isEndpoint('[2001:db8::1]:51820'));
    assert.ok(!isEndpoint('192.0.2.1'));
    assert.ok(!isEndpoint('host.example:1'));
    assert.ok(!isEndpoint('192.0.2.1:70000'));
    assert.ok(isCidr('10.0.0.0/8'));
    assert.ok(!isCidr('10.0.0.0/33'));
    assert.ok(!isCidr('10.0.0.0'));
  });
  it('names nodes after host names as DNS labels', () => {
    assert.equal(toDnsLabel('Web_01.example.com'), 'web-01');
    assert.equal(toDnsLabel('---'), '');
  });
  it('reads the caller address from grpc-js peer strings', () => {
    assert.equal(peerAddress('127.0.0.1:5555'), '127.0.0.1');
    assert.equal(peerAddress('ipv4:192.0.2.3:1'), '192.0.2.3');
    assert.equal(peerAddress('[::1]:5555'), '::1');
  });
});

describe('registration rate limit', () => {
  it('allows a burst per address, then refills over time', () => {
    let now = 0;
    const rl = new RateLimiter(2, 3, () => now);
    assert.deepEqual([rl.take('a'), rl.take('a'), rl.take('a'), rl.take('a')], [true, true, true, false]);
    assert.ok(rl.take('b'), 'other addresses have their own bucket');
    now = 500;
    assert.ok(rl.take('a'));
    assert.ok(!rl.take('a'));
  });

  it('keeps its tokens when its clock goes back an hour', () => {
    let now = 3_600_000;
    const rl = new RateLimiter(1, 2, () => now);
    assert.ok(rl.take('a'));
    now = 0;
    assert.ok(rl.take('a'), 'the second of its burst of 2');
    assert.ok(!rl.take('a'), 'and no more');
  });
});

describe('call signatures', () => {
  it('checks each signature against its own machine key, also once keys are cached', () => {
    const a = generateMachineKey();
    const b = generateMachineKey();
    const body = new Uint8Array([1, 2, 3]);
    const check = (signer: typeof a, key: typeof a) => {
      const h = signCall(signer.secretKey, '/m', 'n1', body);
      const call = {
        method: '/m',
        nodeId: 'n1',
        timestamp: Number(h['mg-timestamp']),
        nonce: h['mg-nonce'],
        bodyHash: sha256(body),
      };
      return verifyCallSignature(call, h['mg-signature'], key.publicKey);
    };
    assert.ok(check(a, a));
    assert.ok(!check(a, b), "a's signature does not pass as b's");
    assert.ok(check(b, b));
    assert.ok(!check(b, a));
    assert.ok(check(a, a));
  });
});

describe('state', () => {
  let dir: string;
  const open: { store: Store; state: State }[] = [];

  const start = async (opts: { seenBatchMs: number; now: () => number }) => {
    const store = await openStore({ url: join(dir, 'meshgate.db') });
    const state = await State.load(store.db, { ephemeralTimeoutMs: 60_000, ...opts });
    open.push({ store, state });
    return { store, state };
  };
  const stop = async (s: { store: Store; state: State }) => {
    open.splice(open.indexOf(s), 1);
    await s.state.close();
    await s.store.close();
  };
  const input = async (state: State, hostname: string): Promise<RegisterInput> => {
    if (!state.listProjects().some((p) => p.name === 'p')) await state.createProject('test', 'p');
    const { key } = await state.keys.createAuthKey('test', {
      project: 'p',
      reusable: false,
      ephemeral: false,
      expiresInMs: 60_000,
      tags: [],
      reason: '',
    });
    return {
      authKey: key,
      machineKey: Buffer.from(generateMachineKey().publicKey).toString('hex'),
      nodeKey: encodeWgKey(generateNodeKey().publicKey),
      hostname,
      os: 'linux',
      version: '1.0.0',
      requestedTags: [],
      endpoints: ['192.0.2.1:41641'],
      advertisedRoutes: [],
    };
  };
  const lastSeen = async (store: Store, id: string) =>
    (await store.db.selectFrom('nodes').select('last_seen').where('id', '=', id).executeTakeFirst())
      ?.last_seen;

  afterEach(async () => {
    for (const s of [...open]) await stop(s);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });
  const fresh = () => {
    dir = mkdtempSync(join(tmpdir(), 'meshgate-state-'));
  };

  it('writes last_seen of nodes going online and offline in a batch after the interval', async () => {
    fresh();
    let now = 1_000;
    const s = await start({ seenBatchMs: 20, now: () => now });
    const { node } = await s.state.register(await input(s.state, 'a'));
    now = 5_000;
    s.state.setOnline(node.id, true);
    now = 6_000;
    s.state.setOnline(node.id, false);
    for (let i = 0; i < 100 && (await lastSeen(s.store, node.id)) !== 6_000; i++) await sleep(10);
    assert.equal(await lastSeen(s.store, node.id), 6_000);
  });

  it('writes the last batch when the state closes and skips nodes deleted meanwhile', async () => {
    fresh();
    let now = 1_000;
    const s = await start({ seenBatchMs: 60_000, now: () => now });
    const { node: kept } = await s.state.register(await input(s.state, 'kept'));
    const { node: gone } = await s.state.register(await input(s.state, 'gone'));
    now = 7_000;
    s.state.setOnline(kept.id, true);
    s.state.setOnline(gone.id, true);
    now = 8_000;
    s.state.setOnline(kept.id, false);
    await s.state.deleteNode('test', gone.id);
    assert.equal(await lastSeen(s.store, kept.id), 1_000, 'nothing is written before the batch is due');
    await stop(s);

    const again = await start({ seenBatchMs: 60_000, now: () => now });
    assert.equal(await lastSeen(again.store, kept.id), 8_000);
    assert.equal(again.state.getNode(kept.id)?.lastSeen, 8_000);
    assert.equal(again.state.getNode(gone.id), undefined);
  });

  it('writes nothing when a known node registers again unchanged', async () => {
    fresh();
    const s = await start({ seenBatchMs: 60_000, now: Date.now });
    const req = await input(s.state, 'a');
    const { node } = await s.state.register(req);
    const events: StateEvent[] = [];
    s.state.onEvent((e) => events.push(e));
    const changes = async () =>
      (await sql<{ n: number }>`select total_changes() as n`.execute(s.store.db)).rows[0]!.n;

    const before = await changes();
    const again = await s.state.register({ ...req, authKey: '' });
    assert.equal(again.existing, true);
    assert.equal(again.node.id, node.id);
    assert.equal(await changes(), before, 'no row written');
    assert.equal(events.length, 0, 'no event');

    await s.state.register({ ...req, authKey: '', version: '1.1.0' });
    assert.equal(await changes(), before + 1, 'a changed version is written');
    assert.deepEqual(
      events.map((e) => [e.type, 'node' in e ? e.node.version : '']),
      [['node-changed', '1.1.0']],
    );
  });

  it('announces a new agent version to peers', async () => {
    fresh();
    const s = await start({ seenBatchMs: 60_000, now: Date.now });
    const { node } = await s.state.register(await input(s.state, 'a'));
    const events: StateEvent[] = [];
    s.state.onEvent((e) => events.push(e));
    await s.state.updateVersion(node.id, '2.0.0');
    await s.state.updateVersion(node.id, '2.0.0');
    assert.deepEqual(
      events.map((e) => [e.type, 'node' in e ? e.node.version : '']),
      [['node-changed', '2.0.0']],
    );
    assert.equal(s.state.getNode(node.id)?.version, '2.0.0');
    const row = await s.store.db
      .selectFrom('nodes')
      .select('version')
      .where('id', '=', node.id)
      .executeTakeFirst();
    assert.equal(row?.version, '2.0.0');
  });

  it('numbers projects and nodes of an older database on upgrade and never reuses a number', async () => {
    fresh();
    const old = new Kysely<unknown>({
      dialect: new SqliteDialect({ database: new SQLite(join(dir, 'meshgate.db')) }),
    });
    await migrate(old, 'sqlite', '0001_initial');
    await sql`insert into projects (name, created_at) values ('second', 2), ('first', 1)`.execute(old);
    await sql`insert into nodes (id, project, name, machine_key, node_key, ipv4, ipv6, ip_index, tags,
      ephemeral, auth_key_id, hostname, os, version, endpoints, advertised_routes, approved_routes, created_at)
      values ('n0', 'first', 'old', 'mk', 'nk', '100.64.0.9', 'fd7a:115c:a1e0::9', 9, '[]',
      0, 'k', 'old', 'linux', '1', '[]', '[]', '[]', 1)`.execute(old);
    await old.destroy();

    let s = await start({ seenBatchMs: 60_000, now: Date.now });
    assert.deepEqual(
      s.state.listProjects().map((p) => [p.name, p.numericId]),
      [
        ['first', 1],
        ['second', 2],
      ],
      'numbered in creation order',
    );
    const { node: a } = await s.state.register(await input(s.state, 'a'));
    assert.equal(s.state.projectByNumber(3)?.name, 'p');
    assert.equal(s.state.getNode('n0')?.numericId, 1);
    assert.equal(a.numericId, 2);
    await s.state.deleteNode('test', a.id);
    await s.state.deleteProject('test', 'second', false);
    await stop(s);

    s = await start({ seenBatchMs: 60_000, now: Date.now });
    assert.equal(
      (await s.state.createProject('test', 'third')).numericId,
      4,
      'a deleted project keeps its number',
    );
    const { node: b } = await s.state.register(await input(s.state, 'b'));
    assert.equal(b.numericId, 3, 'a deleted node keeps its number');
    assert.equal(s.state.nodeByNumber(3)?.id, b.id);
    assert.equal(s.state.nodeByNumber(2), undefined);
  });

  it('answers the loser of two racing creates of one project with "exists"', async () => {
    fresh();
    const s = await start({ seenBatchMs: 60_000, now: Date.now });
    const [a, b] = await Promise.allSettled([
      s.state.createProject('t', 'x'),
      s.state.createProject('t', 'x'),
    ]);
    assert.equal(a.status, 'fulfilled');
    assert.equal(b.status, 'rejected');
    assert.equal((b as PromiseRejectedResult).reason.kind, 'exists');
    assert.deepEqual(
      s.state.listProjects().map((p) => p.name),
      ['x'],
    );
  });

  it('keeps node names unique per project through renames and deletions', async () => {
    fresh();
    const s = await start({ seenBatchMs: 60_000, now: Date.now });
    const name = async (host: string) => (await s.state.register(await input(s.state, host))).node.name;
    assert.equal(await name('web'), 'web');
    assert.equal(await name('web'), 'web-2');
    await s.state.renameNode('test', 'web-2', 'p', 'db');
    assert.equal(await name('web'), 'web-2', 'a rename frees the old name');
    await assert.rejects(s.state.renameNode('test', 'db', 'p', 'web'), /already has a node named "web"/);
    await s.state.deleteNode('test', 'web', 'p');
    assert.equal(await name('web'), 'web', 'a deletion frees the name');
  });
});
