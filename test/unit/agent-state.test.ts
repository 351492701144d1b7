import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { describeNodeState } from '../../agent/control/node-state.js';
import { createAgentLogger, formatRecord } from '../../agent/log.js';

describe('node state lines', () => {
  const ctx = { keyFile: '/etc/meshgate/authkey', keepLockdown: true, lockdown: true };
  it('an expired node says who did it, where the new key goes and what happens to SSH', () => {
    const line = describeNodeState({ kind: 'expired', detail: 'auth key refused: single-use' }, ctx);
    assert.equal(
      line,
      'expired by an admin: write a new auth key to /etc/meshgate/authkey (auth key refused: single-use); ' +
        'it is picked up without a restart; public SSH stays locked down (--lockdown-when-revoked keep), use the console',
    );
  });
  it('a deleted node with release says the lockdown is gone', () => {
    const line = describeNodeState({ kind: 'deleted', detail: '' }, { ...ctx, keepLockdown: false });
    assert.match(line, /^deleted by an admin: write a new auth key to \/etc\/meshgate\/authkey/);
    assert.match(line, /lockdown released \(--lockdown-when-revoked release\)$/);
  });
  it('an unreachable coordinator is not confused with a revoked node', () => {
    assert.equal(
      describeNodeState({ kind: 'unreachable', detail: 'connect ECONNREFUSED' }, ctx),
      'coordinator unreachable (connect ECONNREFUSED): the mesh keeps running from the cached netmap',
    );
  });
  it('without lockdown, nothing is said about SSH', () => {
    const line = describeNodeState({ kind: 'down', detail: '' }, { ...ctx, lockdown: false });
    assert.equal(line, 'down: the mesh is stopped until "meshgate up"');
  });
});

describe('agent log format', () => {
  it('text: time, level, message and fields on one line', () => {
    const line = formatRecord(
      JSON.stringify({
        level: 40,
        time: Date.UTC(2026, 0, 2, 3, 4, 5, 6),
        svc: 'meshgate-agent',
        msg: 'the nftables table was removed',
        restores: 1,
        reason: 'two words',
      }),
      false,
    );
    assert.equal(line, '03:04:05.006 WARN  the nftables table was removed restores=1 reason="two words"');
  });
  it('text mode writes formatted lines to stderr', () => {
    const written: string[] = [];
    const original = process.stderr.write.bind(process.stderr);
    process.stderr.write = ((chunk: string) => {
      written.push(String(chunk));
      return true;
    }) as typeof process.stderr.write;
    try {
      createAgentLogger('info', 'text').info({ peers: 2 }, 'hello');
    } finally {
      process.stderr.write = original;
    }
    assert.match(written.join(''), /^\d\d:\d\d:\d\d\.\d{3} INFO {2}hello peers=2\n$/);
  });
});
