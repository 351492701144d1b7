// Rollout scheduling: how many nodes update at once, who waits and why, and
// how a failed update halts a project.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { plan, type RolloutNode, Rollouts, type RolloutTarget } from '../../coordinator/state/rollout.js';

const target = (version: string, maxUnavailable = 1, entry = ''): RolloutTarget => ({
  entry,
  version,
  allowDowngrade: false,
  maxUnavailable,
});

function fleet(n: number, version: string, t: RolloutTarget): RolloutNode[] {
  return Array.from({ length: n }, (_, i) => ({
    id: `id${i + 1}`,
    name: `n${i + 1}`,
    version,
    online: true,
    target: t,
  }));
}

const states = (r: Rollouts, nodes: RolloutNode[]) =>
  Object.fromEntries([...r.view(nodes)].map(([id, v]) => [id, v.state]));

describe('rollout scheduling', () => {
  it('admits one node at a time by default, in name order, and the next once it runs the new version', () => {
    const r = new Rollouts();
    const nodes = fleet(3, '0.1.0', target('0.1.1'));
    assert.deepEqual(r.schedule(nodes), ['id1']);
    assert.deepEqual(states(r, nodes), { id1: 'updating', id2: 'waiting', id3: 'waiting' });
    assert.equal(r.released(nodes[0]!), true);
    assert.equal(r.released(nodes[1]!), false);
    // Nothing moves while id1 is on its way.
    assert.deepEqual(r.schedule(nodes), []);
    // id1 restarted: offline, still counts.
    nodes[0]!.online = false;
    assert.deepEqual(r.schedule(nodes), []);
    // Back online on the new version: current, and id2 may go.
    nodes[0]!.online = true;
    nodes[0]!.version = '0.1.1';
    assert.deepEqual(r.schedule(nodes), ['id2']);
    assert.deepEqual(states(r, nodes), { id1: 'current', id2: 'updating', id3: 'waiting' });
    nodes[1]!.version = '0.1.1';
    assert.deepEqual(r.schedule(nodes), ['id3']);
    nodes[2]!.version = '0.1.1';
    assert.deepEqual(r.schedule(nodes), []);
    assert.deepEqual(states(r, nodes), { id1: 'current', id2: 'current', id3: 'current' });
  });

  it('admits up to max-unavailable nodes, counted per desired-version entry', () => {
    const nodes = [...fleet(4, '1.0.0', target('1.1.0', 2))];
    const tagged: RolloutNode = {
      id: 't1',
      name: 't1',
      version: '1.0.0',
      online: true,
      target: target('1.2.0', 1, 'tag:edge'),
    };
    const p = plan([...nodes, tagged], new Map());
    assert.deepEqual(p.admit, ['id1', 'id2', 't1']);
    assert.match(p.views.get('id3')!.reason, /2 node\(s\) updating, at most 2 at once/);
  });

  it('does not admit an offline node, and says why it waits', () => {
    const nodes = fleet(2, '0.1.0', target('0.1.1'));
    nodes[0]!.online = false;
    const p = plan(nodes, new Map());
    assert.deepEqual(p.admit, ['id2']);
    assert.deepEqual(p.views.get('id1'), { state: 'waiting', reason: 'offline', released: false });
  });

  it('a failed update halts the project until the version is set again', () => {
    const r = new Rollouts();
    const nodes = fleet(3, '0.1.0', target('0.1.2'));
    assert.deepEqual(r.schedule(nodes), ['id1']);
    r.report('id1', '0.1.2', 'failed', '0.1.2 did not reach the coordinator within 2m; rolled back');
    assert.deepEqual(r.schedule(nodes), []);
    const views = r.view(nodes);
    assert.equal(views.get('id1')!.state, 'failed');
    assert.match(views.get('id1')!.reason, /rolled back/);
    assert.equal(views.get('id2')!.reason, 'rollout halted: the update of n1 failed');
    // The failed node is not told the version again (it would try once more).
    assert.equal(r.released(nodes[0]!), false);
    // A new version is a new rollout: the old failure does not count.
    const next = nodes.map((n) => ({ ...n, target: target('0.1.3') }));
    assert.deepEqual(r.schedule(next), ['id1']);
    // Setting the failed version again retries it.
    r.report('id1', '0.1.2', 'failed', 'bad');
    assert.deepEqual(r.schedule(nodes), []);
    r.retry(nodes.map((n) => n.id));
    assert.deepEqual(r.schedule(nodes), ['id1']);
  });

  it('a node the agent reports as updating counts even if it was not admitted', () => {
    const r = new Rollouts();
    const nodes = fleet(2, '0.1.0', target('0.1.1'));
    r.report('id2', '0.1.1', 'updating', '');
    assert.deepEqual(r.schedule(nodes), []);
    assert.deepEqual(states(r, nodes), { id1: 'waiting', id2: 'updating' });
  });

  it('newer nodes are current unless a downgrade is asked for; nodes without a target are current', () => {
    const newer = fleet(1, '0.2.0', target('0.1.1'));
    assert.equal(plan(newer, new Map()).views.get('id1')!.state, 'current');
    const down = fleet(1, '0.2.0', { ...target('0.1.1'), allowDowngrade: true });
    assert.deepEqual(plan(down, new Map()).admit, ['id1']);
    const none: RolloutNode = { id: 'x', name: 'x', version: '0.1.0', online: true, target: undefined };
    assert.deepEqual(plan([none], new Map()).views.get('x'), {
      state: 'current',
      reason: '',
      released: true,
    });
  });
});
