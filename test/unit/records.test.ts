// Stored rows read back as nodes and auth keys: times a row cannot hold
// are clamped instead of breaking every listing, PostgreSQL's bigints
// (strings) become numbers, and a node expires at its time to the millisecond.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  authKeyFromRow,
  isNodeExpired,
  MAX_TIME_MS,
  type NodeRecord,
  nodeFromRow,
  nodeToRow,
  storedOptionalTime,
  storedTime,
} from '../../coordinator/state/records.js';

/** How PostgreSQL hands out a bigint column. */
const big = (n: number) => String(n) as unknown as number;

const node: NodeRecord = {
  id: '0123456789abcdef',
  numericId: 7,
  project: 'p',
  name: 'web',
  machineKey: 'ab'.repeat(32),
  nodeKey: `${'k'.repeat(43)}=`,
  ipv4: '100.64.0.7',
  ipv6: 'fd7a:115c:a1e0::7',
  ipIndex: 7,
  tags: ['tag:a', 'tag:b'],
  ephemeral: true,
  authKeyId: 'key1',
  hostname: 'web.example',
  os: 'linux',
  version: '1.2.3',
  endpoints: ['192.0.2.1:41641'],
  advertisedRoutes: ['10.1.0.0/16'],
  approvedRoutes: ['10.1.0.0/16'],
  createdAt: 1_000,
  lastSeen: 2_000,
  expiresAt: 3_000,
  keySetAt: 1_500,
  lockdownPorts: [22],
};

describe('stored records', () => {
  it('reads a stored time as a whole number of milliseconds within what a timestamp holds', () => {
    assert.equal(storedTime(1_234), 1_234);
    assert.equal(storedTime('1234'), 1_234);
    assert.equal(storedTime(1_234n), 1_234);
    assert.equal(storedTime(1.5), 2);
    assert.equal(storedTime(1.4), 1);
    assert.equal(storedTime(-5), 0);
    assert.equal(storedTime(0), 0);
    assert.equal(storedTime(MAX_TIME_MS), MAX_TIME_MS);
    assert.equal(storedTime('99999999999999999999'), MAX_TIME_MS);
    assert.equal(storedTime('not a time'), MAX_TIME_MS);
    assert.equal(new Date(MAX_TIME_MS).toISOString(), '9999-12-31T23:59:59.999Z');
    assert.equal(storedOptionalTime(null), null);
    assert.equal(storedOptionalTime('0'), 0);
    assert.equal(storedOptionalTime(42n), 42);
  });

  it('writes a node as a row and reads it back unchanged', () => {
    const row = nodeToRow(node);
    assert.equal(row.ephemeral, 1);
    assert.equal(row.tags, '["tag:a","tag:b"]');
    assert.deepEqual(nodeFromRow(row), node);
    const plain = { ...node, ephemeral: false, lastSeen: null, expiresAt: null, tags: [], lockdownPorts: [] };
    assert.equal(nodeToRow(plain).ephemeral, 0);
    assert.deepEqual(nodeFromRow(nodeToRow(plain)), plain);
  });

  it('reads PostgreSQL bigints as numbers and dates a node key of an older row by its creation', () => {
    const row = {
      ...nodeToRow(node),
      numeric_id: big(7),
      ip_index: big(7),
      created_at: big(1_000),
      last_seen: big(2_000),
      expires_at: big(3_000),
      key_set_at: null,
    };
    assert.deepEqual(nodeFromRow(row), { ...node, keySetAt: 1_000 });
  });

  it('reads an auth key row', () => {
    const row = {
      id: 'key1',
      project: 'p',
      secret_hash: 'h',
      reusable: 1,
      ephemeral: 0,
      tags: '["tag:a"]',
      reason: 'ci',
      created_at: big(1_000),
      expires_at: big(5_000),
      used_count: big(3),
      revoked_at: big(4_000),
    };
    assert.deepEqual(authKeyFromRow(row), {
      id: 'key1',
      project: 'p',
      reusable: true,
      ephemeral: false,
      tags: ['tag:a'],
      reason: 'ci',
      createdAt: 1_000,
      expiresAt: 5_000,
      usedCount: 3,
      revokedAt: 4_000,
    });
    assert.deepEqual(authKeyFromRow({ ...row, reusable: 0, ephemeral: 1, revoked_at: null }), {
      ...authKeyFromRow(row),
      reusable: false,
      ephemeral: true,
      revokedAt: null,
    });
  });

  it('expires a node at its expiry time, not before, and never without one', () => {
    assert.equal(isNodeExpired(node, 2_999), false);
    assert.equal(isNodeExpired(node, 3_000), true);
    assert.equal(isNodeExpired(node, 3_001), true);
    assert.equal(isNodeExpired({ ...node, expiresAt: null }, Number.MAX_SAFE_INTEGER), false);
    assert.equal(isNodeExpired({ ...node, expiresAt: 0 }, 0), true);
  });
});
