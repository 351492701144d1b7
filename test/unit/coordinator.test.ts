import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { peerAddress } from '../../coordinator/api/auth.js';
import { RateLimiter } from '../../coordinator/api/ratelimit.js';
import { isCidr, isEndpoint } from '../../coordinator/api/validate.js';
import { AddressPool, ipv4ForIndex, ipv6ForIndex, MAX_INDEX } from '../../coordinator/state/ipam.js';
import { hashSecret, issueSecret, parseSecret, secretMatches } from '../../coordinator/state/secrets.js';
import { formatDuration, parseDuration } from '../../proto/duration.js';
import { toDnsLabel } from '../../proto/names.js';

describe('secrets', () => {
  it('issues keys in the documented format and stores only a hash', () => {
    const s = issueSecret('auth');
    assert.match(s.key, /^mgkey-auth-[0-9a-f]{12}-[A-Za-z0-9_-]{43}$/);
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
  it('does not accept one kind of key for another', () => {
    assert.equal(parseSecret('api', issueSecret('auth').key), null);
    assert.equal(parseSecret('auth', 'mgkey-auth-short'), null);
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
});
