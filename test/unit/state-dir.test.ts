// The agent's state dir when files in it are damaged: node.json stops the
// agent with one line that says what to do; a damaged netmap cache is
// reported, removed and otherwise ignored.
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import { StateDir, StateDirError } from '../../agent/control/identity.js';
import { describeError } from '../../cli/errors.js';
import { NetMapSchema, PeerSchema } from '../../proto/gen/meshgate/v1/types_pb.js';

describe('agent state dir', () => {
  let dir: string;
  let state: StateDir;
  beforeEach(() => {
    dir = join(mkdtempSync(join(tmpdir(), 'meshgate-statedir-')), 'state');
    state = new StateDir(dir);
  });
  afterEach(() => rmSync(join(dir, '..'), { recursive: true, force: true }));

  const node = {
    id: 'abc123',
    name: 'web-1',
    project: 'p',
    ipAddresses: ['100.64.0.1', 'fd7a:115c:a1e0::1'],
  };

  it('keeps the node identity across loads', () => {
    assert.equal(state.load().node, null, 'no identity before the first registration');
    state.saveNode(node);
    assert.deepEqual(state.load().node, node);
  });

  for (const [what, content] of [
    ['truncated', JSON.stringify(node).slice(0, 20)],
    ['empty', ''],
    ['not an identity', '{"id": 7}'],
  ] as const) {
    it(`stops with one line naming node.json and what to do when it is ${what}`, () => {
      state.load();
      writeFileSync(join(dir, 'node.json'), content, { mode: 0o600 });
      const err = (() => {
        try {
          state.load();
        } catch (e) {
          return e;
        }
        assert.fail('a damaged node.json was accepted');
      })();
      assert.ok(err instanceof StateDirError);
      const line = describeError(err);
      assert.equal(line.split('\n').length, 1, 'one line');
      assert.ok(line.startsWith(`${join(dir, 'node.json')} is damaged (`), line);
      assert.match(line, /delete it and start the agent again with --auth-key-file/);
      assert.doesNotMatch(line, /MESHGATE_DEBUG/, 'an expected failure, not a crash');
    });
  }

  it('reports a state dir open to others as an expected failure', () => {
    state.load();
    chmodSync(join(dir, 'machine.key'), 0o644);
    const fix = (() => {
      try {
        state.load();
      } catch (e) {
        return describeError(e);
      }
      return '';
    })();
    assert.match(fix, /accessible by group or others .*; run: chmod go-rwx/);
    assert.doesNotMatch(fix, /MESHGATE_DEBUG/);
  });

  it('reads back the cached netmap, and reports and removes a damaged one', () => {
    state.load();
    const warnings: string[] = [];
    const warn = (m: string) => warnings.push(m);
    assert.equal(state.loadNetMap(warn), null, 'no cache yet');
    const map = create(NetMapSchema, {
      peers: [create(PeerSchema, { id: 'p1', name: 'db-1', endpoints: ['192.0.2.1:41641'] })],
    });
    state.saveNetMap(map);
    assert.deepEqual(
      state.loadNetMap(warn)?.peers.map((p) => p.name),
      ['db-1'],
    );
    const file = join(dir, 'netmap.bin');
    writeFileSync(file, readFileSync(file).subarray(0, -3));
    assert.equal(state.loadNetMap(warn), null, 'a truncated cache is not used');
    assert.equal(warnings.length, 1);
    assert.ok(warnings[0]!.startsWith(`${file} is damaged (`), warnings[0]);
    assert.match(warnings[0]!, /removed it, peers come back with the next netmap/);
    assert.ok(!existsSync(file), 'and it is gone');
    assert.equal(state.loadNetMap(warn), null);
    assert.equal(warnings.length, 1, 'reported once');
  });
});
