// The same store on PostgreSQL: a throwaway cluster on a unix socket, the
// coordinator on top, registrations, a restart that reloads the state.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

function pgBin(): string | null {
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) return null;
  const version = readdirSync(root).sort().pop();
  return version && existsSync(join(root, version, 'bin', 'initdb')) ? join(root, version, 'bin') : null;
}

const bin = pgBin();
const root = process.getuid?.() === 0;
const skip = !bin
  ? 'PostgreSQL server binaries not installed'
  : !root
    ? 'needs root to run the cluster as postgres'
    : false;
if (skip && process.env.MESHGATE_E2E === '1') throw new Error(`PostgreSQL test: ${skip}`);

describe('coordinator on PostgreSQL', { skip }, () => {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-pg-'));
  const as = (cmd: string, args: string[]) =>
    execFileSync('runuser', ['-u', 'postgres', '--', join(bin!, cmd), ...args], { stdio: 'pipe' });
  const url = `postgres://postgres@/meshgate?host=${encodeURIComponent(dir)}&port=55432`;
  let t: TestCoordinator | null = null;

  before(() => {
    chmodSync(dir, 0o777);
    as('initdb', ['-D', join(dir, 'data'), '-A', 'trust', '-U', 'postgres']);
    as('pg_ctl', [
      '-D',
      join(dir, 'data'),
      '-l',
      join(dir, 'log'),
      '-w',
      '-o',
      `-k ${dir} -p 55432 -c listen_addresses=''`,
      'start',
    ]);
    as('createdb', ['-h', dir, '-p', '55432', 'meshgate']);
  });
  after(async () => {
    await t?.close();
    try {
      as('pg_ctl', ['-D', join(dir, 'data'), '-m', 'immediate', 'stop']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('migrates, registers concurrently with distinct addresses, and reloads after a restart', async () => {
    t = await startTestCoordinator({ database: url });
    const key = await authKey(t, 'pg', { reusable: true });
    const agents = Array.from({ length: 20 }, () => new SimAgent(t!.url, t!.fingerprint));
    const regs = await Promise.all(agents.map((a, i) => a.register(key, `n-${i}`)));
    for (const a of agents) a.close();
    assert.equal(new Set(regs.map((r) => r.node!.ipAddresses[0])).size, 20);
    await t.admin.call('setPolicy', {
      project: 'pg',
      policy: '{"acls":[{"action":"accept","src":["*"],"dst":["*:22"]}]}',
    });
    const dataDir = t.dataDir;
    await t.c.close();
    t.admin.close();
    t = await startTestCoordinator({ database: url, dataDir });
    const nodes = (await t.admin.call('listNodes', { project: 'pg' })).nodes;
    assert.equal(nodes.length, 20);
    assert.match((await t.admin.call('getPolicy', { project: 'pg' })).policy, /dst/);
    const again = new SimAgent(t.url, t.fingerprint, agents[0]!.machine);
    const r = await again.register('', 'n-0');
    again.close();
    assert.equal(r.existing, true);
    assert.deepEqual(r.node!.ipAddresses, regs[0]!.node!.ipAddresses);
  });
});
