// Agents joined through a real coordinator, each in its own network
// namespace, wireguard-go backend: they reach each other over the mesh, a
// newcomer does not disturb existing sessions, --lockdown-ssh leaves SSH only
// on the mesh and stays when the agent stops, and the mesh survives the
// coordinator going away.
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe } from 'node:test';
import { parseSecret } from '../../coordinator/state/secrets.js';
import { TOOLS } from './harness/datacenter.js';
import { buildOnce, labSteps, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';

describe('agent', { skip: suiteSkip(TOOLS) }, () => {
  let lab: MeshLab;
  let addr: Record<string, string>;

  before(async () => {
    buildOnce();
    lab = new MeshLab(new Topology());
    addr = await star(lab.topo, ['coord', 'a', 'b', 'c']);
    await lab.startCoordinator('coord', addr.coord!);
  });
  after(async () => {
    printLogsIfFailed();
    await lab.destroy();
  });
  const { step, printLogsIfFailed } = labSteps(() => lab);

  step('two agents join and ping each other over the mesh', async () => {
    const key = lab.authKey('dc1', { reusable: true });
    lab.startAgent('a', 'a', { keyFile: key });
    lab.startAgent('b', 'b', { keyFile: key, lockdown: true });
    await lab.waitForPeer('a', 'b');
    await lab.waitForPeer('b', 'a');
    const ipB = await lab.meshIp('b');
    await until('ping a -> b over the mesh', async () => {
      await lab.topo.exec('a', 'ping', ['-c', '1', '-W', '1', ipB]);
      return true;
    });
    const { secret } = parseSecret('auth', readFileSync(key, 'utf8'))!;
    const ps = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' });
    assert.ok(ps.includes('meshgate agent') || ps.includes('bin/meshgate agent'), 'the agents show up in ps');
    assert.ok(!ps.includes(secret), 'the auth key secret is in no process argument');
    const wgA = await lab.topo.exec('a', 'wg', ['show', lab.agents.get('a')!.iface, 'dump']);
    const sB = await lab.status('b');
    assert.ok(wgA.includes(sB.self.nodeKey), "a's wg show lists b's key");
    const wgB = await lab.topo.exec('b', 'wg', ['show', lab.agents.get('b')!.iface, 'dump']);
    assert.ok(wgB.includes((await lab.status('a')).self.nodeKey), "b's wg show lists a's key");
  });

  step('a third agent joins without touching the existing session', async () => {
    const before = (await lab.status('a')).peers.find((p) => p.name === 'b')!;
    assert.ok(before.lastHandshake, 'a and b have a handshake');
    lab.startAgent('c', 'c', { keyFile: lab.authKey('dc1') });
    await lab.waitForPeer('a', 'c');
    await lab.waitForPeer('b', 'c');
    const ipC = await lab.meshIp('c');
    await until('ping a -> c', async () => {
      await lab.topo.exec('a', 'ping', ['-c', '1', '-W', '1', ipC]);
      return true;
    });
    const afterJoin = (await lab.status('a')).peers.find((p) => p.name === 'b')!;
    assert.equal(afterJoin.lastHandshake, before.lastHandshake, 'latest handshake of a<->b unchanged');
  });

  step('with --lockdown-ssh, sshd answers over the mesh only', async () => {
    await lab.startSshd('b');
    const ipB = await lab.meshIp('b');
    await until('lockdown on b', async () => (await lab.status('b')).lockdownPorts.includes(22));
    assert.equal(await lab.meshSsh('a', 'a', 'b'), 0, 'meshgate ssh b works');
    assert.equal(await lab.ssh('a', ipB), 0, 'ssh to the mesh address works');
    assert.notEqual(await lab.ssh('a', addr.b!), 0, "ssh to b's other address is dropped");
  });

  step('the coordinator refuses a policy that would leave locked-down b with no SSH path', async () => {
    const nodes = JSON.parse(await lab.adminAsync(['nodes', 'list', '--project', 'dc1', '-o', 'json']));
    assert.deepEqual(
      nodes.find((n: { name: string }) => n.name === 'b').lockdownPorts,
      [22],
      'the agent reports its lockdown',
    );
    const file = join(lab.dataDir, 'no-acls.hujson');
    writeFileSync(file, '{"acls":[]}');
    await assert.rejects(
      lab.adminAsync(['policy', 'set', file, '--project', 'dc1']),
      (err: { stderr: string }) =>
        err.stderr ===
        'meshgate: policy not set: it leaves no path from any other node of the project to locked-down b (tcp 22); fix it, or set it anyway with --force\n',
    );
    assert.equal(await lab.ssh('a', await lab.meshIp('b')), 0, 'ssh over the mesh still works');
  });

  step('a stopped agent keeps the lockdown, so stopping it does not reopen public SSH', async () => {
    await lab.stopAgent('b', 'SIGTERM');
    const table = await lab.topo.exec('b', 'nft', ['list', 'table', 'inet', 'meshgate']);
    assert.match(table, /tcp dport 22 drop/, 'the lockdown rule is still loaded');
    assert.notEqual(await lab.ssh('a', addr.b!), 0, "ssh to b's other address is still dropped");
    lab.startAgent('b', 'b', { keyFile: lab.keyFileOf('b'), lockdown: true });
    await until('b reconnected', async () => (await lab.status('b')).coordinator.state === 'connected');
    await lab.waitForPeer('b', 'a');
  });

  step(
    'the mesh survives the coordinator: open sessions stay, a restarted agent restores its peers',
    async () => {
      const ipB = await lab.meshIp('b');
      const session = spawn(
        'ip',
        ['netns', 'exec', lab.topo.ns('a'), 'ssh', ...lab.sshOptions(), ipB, 'cat'],
        { stdio: ['pipe', 'pipe', 'pipe'] },
      );
      let echoed = '';
      session.stdout.on('data', (d) => {
        echoed += d;
      });
      try {
        session.stdin.write('before\n');
        await until('echo before', async () => echoed.includes('before'));
        await lab.stopCoordinator('SIGKILL');
        session.stdin.write('during\n');
        await until('echo during the outage', async () => echoed.includes('during'));

        await lab.stopAgent('a', 'SIGTERM');
        lab.startAgent('a', 'a', {
          keyFile: lab.agents.get('a')!.args[lab.agents.get('a')!.args.indexOf('--auth-key-file') + 1]!,
        });
        await lab.waitForPeer('a', 'b', true, 20_000);
        await until(
          'ping a -> b after agent restart, coordinator down',
          async () => {
            await lab.topo.exec('a', 'ping', ['-c', '1', '-W', '1', ipB]);
            return true;
          },
          20_000,
        );
        assert.equal(await lab.ssh('a', ipB), 0, 'a new ssh session opens during the outage');
      } finally {
        session.kill();
      }
      await lab.startCoordinator('coord', addr.coord!);
      await until(
        'agents reconnect',
        async () => (await lab.status('a')).coordinator.state === 'connected',
        40_000,
      );
    },
  );
});
