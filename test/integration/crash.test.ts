// kill -9 in the middle of a registration burst: after a restart no
// address is shared, no node is half-made, and every acknowledged
// registration is there.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, it } from 'node:test';
import { SimAgent } from './harness.js';
import { meshgate, startCoordinator, stop } from './process.js';

const dataDir = mkdtempSync(join(tmpdir(), 'meshgate-crash-'));
after(() => rmSync(dataDir, { recursive: true, force: true }));

it('survives kill -9 during 100 concurrent registrations', async () => {
  const socket = ['--socket', join(dataDir, 'admin.sock')];
  let c = await startCoordinator(dataDir);
  try {
    assert.equal((await meshgate(['projects', 'create', 'crash', ...socket])).code, 0);
    const created = await meshgate([
      'keys',
      'create',
      '--project',
      'crash',
      '--reusable',
      '-o',
      'json',
      ...socket,
    ]);
    assert.equal(created.code, 0, created.stderr);
    const key = JSON.parse(created.stdout).key as string;
    const url = `grpcs://127.0.0.1:${c.grpcPort}`;
    const agents = Array.from({ length: 100 }, () => new SimAgent(url, c.fingerprint));
    const acked = new Map<SimAgent, string[]>();
    let killed = false;
    // Arrivals spread over half a second: registrations that commit together
    // are acknowledged together, and a burst that arrived at once could all be
    // acknowledged before the kill lands, leaving nothing to cut off.
    await Promise.allSettled(
      agents.map(async (a, i) => {
        await new Promise((r) => setTimeout(r, i * 5));
        const r = await a.register(key, `m-${i}`);
        acked.set(a, r.node!.ipAddresses);
        if (acked.size >= 10 && !killed) {
          killed = true;
          c.proc.kill('SIGKILL');
        }
      }),
    );
    for (const a of agents) a.close();
    await stop(c.proc);
    assert.ok(killed, 'the coordinator was killed mid-burst');
    assert.ok(acked.size < 100, `some registrations were cut off (${acked.size} acknowledged)`);

    c = await startCoordinator(dataDir);
    const nodes = JSON.parse((await meshgate(['nodes', 'list', '-o', 'json', ...socket])).stdout) as {
      id: string;
      name: string;
      ipAddresses: string[];
    }[];
    const v4 = nodes.map((n) => n.ipAddresses[0]);
    assert.equal(new Set(v4).size, nodes.length, 'no address is shared');
    for (const n of nodes) assert.equal(n.ipAddresses.length, 2, `${n.name} has both addresses`);
    for (const ips of acked.values()) assert.ok(v4.includes(ips[0]), `acknowledged node ${ips[0]} survived`);

    // The cut-off machines retry with the same machine keys: each gets exactly one node.
    const url2 = `grpcs://127.0.0.1:${c.grpcPort}`;
    await Promise.all(
      agents.map(async (a, i) => {
        const retry = new SimAgent(url2, c.fingerprint, a.machine);
        const r = await retry.register(key, `m-${i}`);
        if (acked.has(a)) assert.deepEqual(r.node!.ipAddresses, acked.get(a), 'same node after restart');
        retry.close();
      }),
    );
    const all = JSON.parse((await meshgate(['nodes', 'list', '-o', 'json', ...socket])).stdout) as {
      ipAddresses: string[];
    }[];
    assert.equal(all.length, 100);
    assert.equal(new Set(all.map((n) => n.ipAddresses[0])).size, 100);
    assert.equal(new Set(all.map((n) => n.ipAddresses[1])).size, 100);
  } finally {
    await stop(c.proc);
  }
});
