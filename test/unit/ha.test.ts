// The pieces of running several coordinators that need no database: the
// agent's list of coordinators, and one TLS identity for all of them.
import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ControlClient } from '../../agent/control/client.js';
import { ConfigError, loadConfig } from '../../coordinator/config.js';
import { AddressPool, MAX_INDEX } from '../../coordinator/state/ipam.js';
import { ensureTlsIdentity, loadTlsFiles, TlsError } from '../../coordinator/tls.js';
import { generateMachineKey } from '../../proto/keys.js';

const client = (url: string) => new ControlClient({ url, machineSecretKey: generateMachineKey().secretKey });

describe('several coordinator addresses', () => {
  it('moves to the next address on failover and comes round to every one', () => {
    const c = client('grpcs://a:7443, grpcs://b:7443,grpcs://c:7443');
    const seen = new Set<string>();
    for (let i = 0; i < 3; i++) {
      seen.add(c.display);
      const before = c.display;
      c.failover();
      assert.notEqual(c.display, before);
    }
    assert.deepEqual([...seen].sort(), ['grpcs://a:7443', 'grpcs://b:7443', 'grpcs://c:7443']);
  });

  it('keeps a single address', () => {
    const c = client('grpcs://a:7443');
    c.failover();
    assert.equal(c.display, 'grpcs://a:7443');
  });
});

describe('a shared TLS identity', () => {
  it('serves the given pair with the fingerprint of its key', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'meshgate-tls-'));
    try {
      const made = await ensureTlsIdentity(dir);
      const loaded = loadTlsFiles(join(dir, 'tls.key'), join(dir, 'tls.crt'));
      assert.equal(loaded.fingerprint, made.fingerprint);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses a key others may read, and a key that does not fit the certificate', async () => {
    const one = mkdtempSync(join(tmpdir(), 'meshgate-tls-'));
    const two = mkdtempSync(join(tmpdir(), 'meshgate-tls-'));
    try {
      await ensureTlsIdentity(one);
      await ensureTlsIdentity(two);
      assert.throws(() => loadTlsFiles(join(one, 'tls.key'), join(two, 'tls.crt')), TlsError);
      chmodSync(join(one, 'tls.key'), 0o644);
      assert.throws(() => loadTlsFiles(join(one, 'tls.key'), join(one, 'tls.crt')), ConfigError);
    } finally {
      rmSync(one, { recursive: true, force: true });
      rmSync(two, { recursive: true, force: true });
    }
  });

  it('wants the key and the certificate together', () => {
    assert.throws(() => loadConfig(undefined, {}, { tlsKeyFile: '/k' }), ConfigError);
    assert.equal(loadConfig(undefined, {}, { tlsKeyFile: '/k', tlsCertFile: '/c' }).tlsCertFile, '/c');
  });
});

describe('addresses taken in turns from a shared counter', () => {
  it('starts at the n-th address, skips used ones and wraps past the end', () => {
    const pool = new AddressPool([5, 6]);
    assert.equal(pool.reserveFrom(3), 3);
    assert.equal(pool.reserveFrom(5), 7);
    assert.equal(pool.reserveFrom(MAX_INDEX + 1), 1);
    pool.use(MAX_INDEX);
    assert.equal(pool.reserveFrom(MAX_INDEX), 2);
  });
});
