// Scheduled node key rotation with real agents: with a lifetime of a few
// seconds both agents rotate several times while an SSH session between them
// streams a line every 200 ms, and the session never drops.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { after, before, describe } from 'node:test';
import { TOOLS } from './harness/datacenter.js';
import { buildOnce, labSteps, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';

const LINES = 60;

describe('node key rotation', { skip: suiteSkip(TOOLS) }, () => {
  let lab: MeshLab;
  let addr: Record<string, string>;

  before(async () => {
    buildOnce();
    lab = new MeshLab(new Topology());
    addr = await star(lab.topo, ['coord', 'a', 'b']);
    await lab.startCoordinator('coord', addr.coord!);
  });
  after(async () => {
    printLogsIfFailed();
    await lab.destroy();
  });
  const { step, printLogsIfFailed } = labSteps(() => lab);

  const rotations = (name: string) =>
    lab.agents
      .get(name)!
      .log.join('')
      .split('\n')
      .filter((l) => l.includes('rotated the node key')).length;

  step('an SSH session survives at least two rotations of both keys', async (t) => {
    const key = lab.authKey('rot', { reusable: true });
    const extra = ['--node-key-lifetime', '3s'];
    lab.startAgent('a', 'a', { keyFile: key, extra });
    lab.startAgent('b', 'b', { keyFile: key, extra });
    await lab.startSshd('b');
    await lab.waitForPeer('a', 'b');
    await lab.waitForPeer('b', 'a');
    const ipB = await lab.meshIp('b');
    const firstA = (await lab.status('a')).self.nodeKey;
    const firstB = (await lab.status('b')).self.nodeKey;
    await until('ssh a -> b over the mesh', async () => (await lab.ssh('a', ipB)) === 0, 20_000);

    const started = { a: rotations('a'), b: rotations('b') };
    const session = spawn(
      'ip',
      [
        'netns',
        'exec',
        lab.topo.ns('a'),
        'ssh',
        ...lab.sshOptions(),
        ipB,
        `for i in $(seq 1 ${LINES}); do echo line $i; sleep 0.2; done`,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    let err = '';
    let last = 0;
    let longestGap = 0;
    session.stdout.on('data', (d) => {
      const now = Date.now();
      if (last) longestGap = Math.max(longestGap, now - last);
      last = now;
      out += d;
    });
    session.stderr.on('data', (d) => {
      err += d;
    });
    const exited = new Promise<number | null>((resolve) => session.once('exit', (code) => resolve(code)));
    try {
      const code = await Promise.race([
        exited,
        new Promise<never>((_, reject) => setTimeout(() => reject(new Error('the session hung')), 60_000)),
      ]);
      assert.equal(code, 0, `ssh ended with ${code}: ${err}`);
    } finally {
      session.kill();
    }
    const lines = out.trim().split('\n');
    assert.equal(lines.length, LINES, 'every line arrived');
    assert.equal(lines.at(-1), `line ${LINES}`);
    assert.ok(
      rotations('a') - started.a >= 2,
      `a rotated ${rotations('a') - started.a} times during the session`,
    );
    assert.ok(
      rotations('b') - started.b >= 2,
      `b rotated ${rotations('b') - started.b} times during the session`,
    );
    t.diagnostic(
      `rotations during the session: a ${rotations('a') - started.a}, b ${rotations('b') - started.b}; longest pause between lines ${longestGap} ms`,
    );

    // Each side's wg shows the key the other side has now, not the one it started with.
    await until(
      'wg show to list the current keys',
      async () => {
        const [sa, sb] = [await lab.status('a'), await lab.status('b')];
        const wgA = await lab.topo.exec('a', 'wg', ['show', lab.agents.get('a')!.iface, 'peers']);
        const wgB = await lab.topo.exec('b', 'wg', ['show', lab.agents.get('b')!.iface, 'peers']);
        return wgA.trim() === sb.self.nodeKey && wgB.trim() === sa.self.nodeKey;
      },
      10_000,
      100,
    );
    const [sa, sb] = [await lab.status('a'), await lab.status('b')];
    assert.notEqual(sa.self.nodeKey, firstA);
    assert.notEqual(sb.self.nodeKey, firstB);
  });
});
